package dev.wisp.edge

import java.io.IOException

/** A user-facing failure: the message says what went wrong. */
open class WispException(message: String, cause: Throwable? = null) : RuntimeException(message, cause)

/** An error frame from the verifier. */
class WispServerException(val code: ErrorCode, val serverMessage: String) :
    WispException("${code.wire}: $serverMessage")

data class ClientConfig(
    val tokenizerFingerprint: String,
    /** Sent as `Hello.auth_token`; transports that can set headers send it as `Authorization: Bearer` too. */
    val authToken: String? = null,
    val clientName: String = "wisp-android",
    val connectTimeoutMs: Long = 10_000,
    /** No frame for this long while waiting for an answer: the link is treated as dead and resumed. */
    val frameTimeoutMs: Long = 60_000,
    /** Give up reconnecting after this long without a working connection. */
    val reconnectDeadlineMs: Long = 30_000,
    val backoffInitialMs: Long = 50,
    val backoffMaxMs: Long = 2_000,
)

data class GenerateOptions(
    val maxNewTokens: Int = 256,
    val sampling: SamplingParams = SamplingParams(),
    val slo: Slo = Slo(),
    val stopTokenIds: List<Int> = emptyList(),
    /**
     * Offer the server to decode the first tokens (`Open.start_on_server`). A session whose offer the server takes
     * opens centralized (`Opened.mode`), and the server hands it to the edge later with a `Switch`. null (the
     * default): offer only while the server decodes this client's sessions ([serverDecodesNext]); this client
     * prefills its draft only when it drafts the first round, so there is no prefill to hide otherwise (wisp_sdk's
     * prefill rule). true: always offer; false: never.
     */
    val startOnServer: Boolean? = null,
)

/**
 * After a generation: offer `start_on_server` on the next one? A session that a verdict moved to server-side
 * decoding, and that the server never handed back, says the server decodes this device's sessions (its regime
 * decodes the fleet, or the device is too slow for its SLO): the next one would be moved at its first verdict,
 * after a first round drafted at the session's cost. On an H200 (7B, Mac mini, ShareGPT, TPOT 60) 85 % of the
 * sessions of a fleet the server decoded made that round, and offering cut them to 8 % (wisp_sdk's
 * `server_decodes_next`, runs 65-66). A hand-back (`Switch`), or a generation that ended on the edge, says the
 * server speculates again. A session decoded from the start that finished before any hand-back says nothing new.
 */
fun serverDecodesNext(previous: Boolean, movedToServer: Boolean, handedToEdge: Boolean, endedOnEdge: Boolean): Boolean =
    if (handedToEdge || endedOnEdge) false else movedToServer || previous

/** One round as the edge saw it (times in ms). */
data class RoundStats(
    val round: Int,
    val drafted: Int,
    val accepted: Int,
    val draftMs: Double,
    val waitMs: Double,
    /** Draft time spent on tokens past the first rejection (and dropped ones), plus idle wait for the verdict. */
    val wastedMs: Double,
    val queueMs: Double,
    val verifyMs: Double,
)

class GenerationStats {
    var tokens = 0
    var rounds = 0
    var drafted = 0
    var accepted = 0
    var ttftMs = 0.0
    var totalMs = 0.0
    var draftMs = 0.0
    var waitMs = 0.0
    var wastedMs = 0.0
    var reconnects = 0
    var rebuilds = 0
    var switches = 0 // times the server moved the session between speculative rounds and its own decoding

    val acceptance: Double get() = if (drafted > 0) accepted.toDouble() / drafted else 0.0
    val meanAcceptedPerRound: Double get() = if (rounds > 0) accepted.toDouble() / rounds else 0.0

    /** Output tokens per second over the whole generation. */
    val tokensPerSecond: Double get() = if (totalMs > 0) tokens * 1000.0 / totalMs else 0.0

    /** Time per output token after the first. */
    val tpotMs: Double get() = if (tokens > 1) (totalMs - ttftMs) / (tokens - 1) else 0.0

    override fun toString(): String = "tokens=$tokens rounds=$rounds accepted/round=%.2f acceptance=%.2f ttft=%.0fms tpot=%.1fms tok/s=%.1f wasted=%.0fms reconnects=$reconnects"
        .format(meanAcceptedPerRound, acceptance, ttftMs, tpotMs, tokensPerSecond, wastedMs)
}

class GenerationResult(val tokens: List<Int>, val stats: GenerationStats, val rounds: List<RoundStats>)

/** Called on the generating thread each time tokens are committed. */
fun interface TokenListener {
    fun onTokens(newTokens: List<Int>, stats: GenerationStats)
}

/**
 * The edge client: drafts with a [DraftModel], lets the verifier judge each round, and streams committed tokens.
 *
 * A dropped connection is retried with backoff and the session resumed (`Resume` -> `Resumed`, then the round in
 * flight is re-sent: rounds are idempotent on the server). If the server lost the session, the client rebuilds it
 * with `Open{committed_ids}`. No token is lost or duplicated, so greedy output is identical to an undisturbed run.
 *
 * Not thread-safe: one generation at a time. [dropConnection] may be called from any thread.
 */
class EdgeClient(
    private val transport: Transport,
    private val draft: DraftModel,
    private val config: ClientConfig,
    private val controller: Controller = Wisp(),
) : AutoCloseable {
    @Volatile private var conn: Connection? = null
    var limits: Limits? = null
        private set
    var serverPolicy: String? = null
        private set
    val link = LinkState()

    /** The server decoded this client's last generation after moving it there ([serverDecodesNext]). */
    var serverDecodes = false
        private set

    /** Abruptly drop the current connection (fault tests, the demo's "drop link" button). */
    fun dropConnection() {
        conn?.let { OkHttpTransport.cancel(it) }
    }

    override fun close() {
        conn?.close()
        conn = null
    }

    // ---- generation ----

    private class Session(
        val prompt: List<Int>,
        val opts: GenerateOptions,
        var id: String = "",
        var round: Int = 0,
        val committed: MutableList<Int> = ArrayList(),
        var done: Boolean = false,
        // "centralized" while the server decodes the session itself (Verdict.centralize, or an Opened whose mode
        // says the server took the start_on_server offer, .. Switch).
        var mode: String = "speculative",
        // The server's committed_len at the last resume: Tokens must bring us up to it before drafting.
        var serverLen: Int = 0,
        // The last verdict's draft_cap: the most draft tokens the server wants in the next round (0: no cap).
        var draftCap: Int = 0,
        // Open.start_on_server for this generation (and its rebuilds); what it saw, for [serverDecodesNext]
        var offer: Boolean = false,
        var movedToServer: Boolean = false,
        var handedToEdge: Boolean = false,
    ) {
        val output: List<Int> get() = committed.subList(prompt.size, committed.size)
    }

    fun generate(promptIds: List<Int>, opts: GenerateOptions = GenerateOptions(), listener: TokenListener? = null): GenerationResult {
        require(promptIds.isNotEmpty()) { "prompt must not be empty" }
        val t0 = System.nanoTime()
        val stats = GenerationStats()
        val rounds = ArrayList<RoundStats>()
        val rng = java.util.Random(opts.sampling.seed ?: System.nanoTime())
        val s = Session(promptIds, opts, offer = opts.startOnServer ?: serverDecodes)
        val eos = opts.stopTokenIds.toSet()
        s.committed.addAll(promptIds)
        this.stats = stats
        currentSession = null

        val opened = withReconnect(stats) { c -> openSession(c, s, emptyList()) }
        applyOpened(s, opened)
        if (opened.nextToken in eos || opts.maxNewTokens <= 1) s.done = true
        currentSession = s
        stats.ttftMs = msSince(t0)
        stats.tokens = s.output.size
        listener?.onTokens(listOf(opened.nextToken), stats)

        while (!s.done) {
            if (s.mode == "centralized" || s.committed.size < s.serverLen) {
                // The server decodes this session now: take its tokens until the end or a Switch back (the next
                // round's draft.sync then catches the draft's KV up on them).
                val rebuilt = withReconnect(stats) { c -> centralStretch(c, s, eos, listener, stats) }
                if (rebuilt is Opened) {
                    applyOpened(s, rebuilt)
                    if (rebuilt.nextToken in eos || s.output.size >= opts.maxNewTokens) s.done = true
                    stats.tokens = s.output.size
                    listener?.onTokens(listOf(rebuilt.nextToken), stats)
                }
                continue
            }
            s.round += 1
            // ---- draft ----
            val tDraft = System.nanoTime()
            val proposed = ArrayList<DraftToken>()
            val kept = ArrayList<DraftToken>()
            link.maxDraft = limits?.maxDraftLen ?: link.maxDraft
            if (s.draftCap > 0) link.maxDraft = minOf(link.maxDraft, s.draftCap)
            controller.startRound(link)
            // The verdict always adds one token, so never draft what max_new_tokens would cut anyway; and never
            // past the server's context limit (context + draft may not exceed it: too_large).
            val remaining = opts.maxNewTokens - s.output.size
            val room = minOf(remaining - 1, (limits?.maxContextLen ?: Int.MAX_VALUE) - s.committed.size)
            val limit = maxOf(0, minOf(room, link.maxDraft, controller.maxDraft))
            var forwardMs = 0.0
            var forwards = 0
            while (kept.size < limit) {
                val t = System.nanoTime()
                if (kept.isEmpty()) draft.sync(s.committed.toIntArray()) else draft.advance(kept.last().token)
                val ms = msSince(t)
                if (kept.isNotEmpty()) {
                    forwardMs += ms
                    forwards++
                }
                val tok = Proposer.propose(draft.nextLogits(), opts.sampling, rng, ms)
                proposed.add(tok)
                val action = controller.step(kept + tok)
                if (action == Action.DROP) break
                kept.add(tok)
                if (action == Action.SEND || tok.token in eos) break // nothing follows an EOS
            }
            val draftMs = msSince(tDraft)
            if (forwards > 0) link.draftMs = ema(link.draftMs, forwardMs / forwards, 0.7)

            val sparse = !opts.sampling.greedy
            val round = Round(
                sessionId = s.id,
                round = s.round,
                committedLen = s.committed.size,
                draftIds = kept.map { it.token },
                qIds = if (sparse) kept.map { it.q!!.ids } else null,
                qProbs = if (sparse) kept.map { it.q!!.probs } else null,
            )

            // ---- verify ----
            val tSend = System.nanoTime()
            val outcome = withReconnect(stats) { c -> exchange(c, s, round) }
            val waitMs = msSince(tSend)
            val accepted: Int
            val newTokens: List<Int>
            var queueMs = 0.0
            var verifyMs = 0.0
            when (outcome) {
                is Verdict -> {
                    accepted = outcome.accepted
                    // The server may verify only a prefix (the tail did not pay its price): the rest is unjudged.
                    val verified = kept.size - outcome.unverified
                    if (verified < 0 || accepted > verified) {
                        throw ProtocolException("verdict accepts $accepted of ${kept.size} drafts (${outcome.unverified} unverified)")
                    }
                    val verdictTokens = kept.subList(0, accepted).map { it.token } + outcome.nextToken
                    if (outcome.committedLen != s.committed.size + verdictTokens.size) {
                        throw ProtocolException("verdict committed_len ${outcome.committedLen}, client has ${s.committed.size + verdictTokens.size}")
                    }
                    newTokens = commitLocally(s, verdictTokens, eos)
                    s.done = s.done || outcome.done
                    queueMs = outcome.queueMs.toDouble()
                    verifyMs = outcome.verifyMs.toDouble()
                    controller.observe(kept.subList(0, verified), accepted)
                    link.priceMs = outcome.priceMs.toDouble()
                    link.launchInMs = outcome.launchInMs.toDouble()
                    s.draftCap = outcome.draftCap
                    if (outcome.centralize && !s.done) {
                        s.mode = "centralized"
                        s.movedToServer = true
                        stats.switches++
                    }
                    link.verifyMs = ema(link.verifyMs, verifyMs, 0.7)
                    link.rttMs = ema(link.rttMs, maxOf(0.0, waitMs - queueMs - verifyMs), 0.7)
                    link.waitHintMs = outcome.waitHintMs.toDouble()
                }
                is Opened -> { // the server lost the session; it was rebuilt from our committed context
                    accepted = 0
                    newTokens = listOf(outcome.nextToken)
                    applyOpened(s, outcome)
                    if (outcome.nextToken in eos || s.output.size >= opts.maxNewTokens) s.done = true
                }
                is Tokens -> { // switched to server-side decoding while the link was down: Tokens hold the commit
                    accepted = 0
                    newTokens = emptyList()
                }
                else -> throw IllegalStateException("unexpected outcome $outcome")
            }
            val wastedDraft = proposed.drop(accepted + 1).sumOf { it.ms }
            val rs = RoundStats(s.round, kept.size, accepted, draftMs, waitMs, wastedDraft + waitMs, queueMs, verifyMs)
            rounds.add(rs)
            stats.rounds++
            stats.drafted += kept.size
            stats.accepted += accepted
            stats.draftMs += draftMs
            stats.waitMs += waitMs
            stats.wastedMs += rs.wastedMs
            stats.tokens = s.output.size
            stats.totalMs = msSince(t0)
            listener?.onTokens(newTokens, stats)
        }
        stats.totalMs = msSince(t0)
        currentSession = null
        serverDecodes = serverDecodesNext(serverDecodes, s.movedToServer, s.handedToEdge, s.mode == "speculative")
        closeSession(s.id)
        return GenerationResult(ArrayList(s.output), stats, rounds)
    }

    /** Append [tokens] up to an EOS or max_new_tokens, whichever comes first; returns what was appended. */
    private fun commitLocally(s: Session, tokens: List<Int>, eos: Set<Int>): List<Int> {
        val out = ArrayList<Int>(tokens.size)
        for (t in tokens) {
            if (s.done) break
            s.committed.add(t)
            out.add(t)
            if (t in eos || s.output.size >= s.opts.maxNewTokens) s.done = true
        }
        return out
    }

    private fun applyOpened(s: Session, o: Opened) {
        s.id = o.sessionId
        s.round = 0
        s.committed.add(o.nextToken)
        if (o.committedLen != s.committed.size) {
            throw ProtocolException("opened committed_len ${o.committedLen}, client has ${s.committed.size}")
        }
        s.done = o.done
        // A (re)opened session drafts, unless the server took its start_on_server offer: then Tokens follow until
        // a Switch hands it to the edge (as wisp_sdk's Session.on_opened).
        s.mode = if (o.mode == "centralized") "centralized" else "speculative"
        s.serverLen = 0
        link.waitHintMs = o.waitHintMs
    }

    private fun openSession(c: Connection, s: Session, committedIds: List<Int>): Opened {
        val open = Open(
            s.prompt, committedIds, s.opts.maxNewTokens, s.opts.sampling, s.opts.slo, "speculative",
            s.opts.stopTokenIds, startOnServer = s.offer,
        )
        c.send(open.encode())
        while (true) {
            when (val m = receive(c)) {
                is Opened -> return m
                is ErrorMsg -> throw WispServerException(m.code, m.message)
                else -> {} // a late frame of an earlier session
            }
        }
    }

    /** Tokens (and a Switch back) of a stretch of server-side decoding; an Opened if the session was rebuilt. */
    private fun centralStretch(
        c: Connection, s: Session, eos: Set<Int>, listener: TokenListener?, stats: GenerationStats,
    ): ServerMessage? {
        while (!s.done && (s.mode == "centralized" || s.committed.size < s.serverLen)) {
            when (val m = receive(c)) {
                is Tokens -> if (m.sessionId == s.id) {
                    val first = m.committedLen - m.tokens.size
                    if (first > s.committed.size) {
                        throw ProtocolException("tokens frame starts at $first, client has ${s.committed.size}")
                    }
                    val fresh = commitLocally(s, m.tokens.drop(s.committed.size - first), eos)
                    s.done = s.done || m.done
                    stats.tokens = s.output.size
                    if (fresh.isNotEmpty()) listener?.onTokens(fresh, stats)
                }
                is Switch -> if (m.sessionId == s.id) {
                    if (m.committedLen != s.committed.size) {
                        throw ProtocolException("switch at committed_len ${m.committedLen}, client has ${s.committed.size}")
                    }
                    s.mode = "speculative"
                    s.handedToEdge = true
                    stats.switches++
                }
                is ErrorMsg -> {
                    if (m.code == ErrorCode.UNKNOWN_SESSION) return rebuild(c, s)
                    throw WispServerException(m.code, m.message)
                }
                else -> {}
            }
        }
        return null
    }

    /**
     * Send [round] and wait for its verdict; returns a Verdict, or an Opened if the session had to be rebuilt, or
     * an empty Tokens if a resume found the session switched to server-side decoding (the round was applied).
     */
    private fun exchange(c: Connection, s: Session, round: Round): ServerMessage {
        if (s.mode == "centralized") return Tokens(s.id, emptyList(), s.committed.size)
        c.send(round.encode())
        while (true) {
            when (val m = receive(c)) {
                is Verdict -> if (m.sessionId == s.id && m.round == round.round) return m
                is ErrorMsg -> {
                    if (m.code == ErrorCode.UNKNOWN_SESSION) return rebuild(c, s)
                    throw WispServerException(m.code, m.message)
                }
                else -> {}
            }
        }
    }

    /** The server lost the session: open a new one from the prompt and everything committed so far. */
    private fun rebuild(c: Connection, s: Session): Opened {
        val committedIds = ArrayList(s.output)
        s.committed.clear()
        s.committed.addAll(s.prompt)
        s.committed.addAll(committedIds)
        stats?.let { it.rebuilds++ }
        return openSession(c, s, committedIds)
    }

    private var stats: GenerationStats? = null

    private fun closeSession(id: String) {
        val c = conn ?: return
        try {
            c.send(Close(id).encode())
            val deadline = System.nanoTime() + 2_000_000_000L
            while (System.nanoTime() < deadline) {
                val f = c.receive(100) ?: continue
                if (f is Frame.Gone) break
                if (f is Frame.Text && Codec.decodeServer(f.text).let { it is Closed || it is ErrorMsg }) break
            }
        } catch (e: IOException) {
            // The session expires on the server by itself.
        }
    }

    // ---- connection handling ----

    private fun receive(c: Connection): ServerMessage {
        val f = c.receive(config.frameTimeoutMs)
            ?: run {
                c.close()
                throw ConnectionLost("no frame from the server in ${config.frameTimeoutMs} ms")
            }
        return when (f) {
            is Frame.Text -> Codec.decodeServer(f.text)
            is Frame.Binary -> Codec.decodeServer(f.bytes)
            is Frame.Gone -> throw ConnectionLost(f.reason, f.error)
        }
    }

    private fun handshake(c: Connection) {
        c.send(Hello(config.tokenizerFingerprint, config.authToken, config.clientName).encode())
        when (val m = receive(c)) {
            is Welcome -> {
                limits = m.limits
                serverPolicy = m.policy
            }
            is ErrorMsg -> throw WispServerException(m.code, m.message)
            else -> throw ProtocolException("expected welcome, got $m")
        }
    }

    private fun connected(): Connection {
        conn?.let { return it }
        val c = transport.connect(config.connectTimeoutMs)
        try {
            handshake(c)
        } catch (e: Throwable) {
            c.close()
            throw e
        }
        conn = c
        return c
    }

    /**
     * Run [body] on a live connection. When the link drops: reconnect with backoff, resume the session (if there is
     * one) and run [body] again, until [ClientConfig.reconnectDeadlineMs] passes without success.
     */
    private fun <T> withReconnect(stats: GenerationStats, body: (Connection) -> T): T {
        var backoff = config.backoffInitialMs
        var lostAt = 0L
        var lastError: Throwable? = null
        var needResume: Session? = null
        while (true) {
            try {
                val c = connected()
                needResume?.let { sess -> resume(c, sess)?.let { @Suppress("UNCHECKED_CAST") return it as T } }
                return body(c)
            } catch (e: IOException) {
                lastError = e
                conn?.close()
                conn = null
                if (lostAt == 0L) lostAt = System.nanoTime()
                if (msSince(lostAt) > config.reconnectDeadlineMs) {
                    throw WispException("lost the connection to the server and could not resume within ${config.reconnectDeadlineMs} ms: ${lastError.message}", lastError)
                }
                stats.reconnects++
                Thread.sleep(backoff)
                backoff = minOf(config.backoffMaxMs, backoff * 2)
                needResume = currentSession
            }
        }
    }

    // The session to resume after a reconnect (set while rounds run).
    private var currentSession: Session? = null

    /** Resume [s] on a fresh connection; returns an Opened if the session had to be rebuilt, else null. */
    private fun resume(c: Connection, s: Session): Opened? {
        c.send(Resume(s.id).encode())
        while (true) {
            when (val m = receive(c)) {
                is Resumed -> {
                    // last_round == s.round: the server applied our round and its verdict was lost; re-sending the
                    // same round gets the cached verdict. last_round == s.round - 1: it never got the round.
                    if (m.lastRound != s.round && m.lastRound != s.round - 1) {
                        throw ProtocolException("resumed at round ${m.lastRound}, client is at round ${s.round}")
                    }
                    if (m.mode != s.mode || s.mode == "centralized") {
                        // Switched (or switched back) while the link was down: a Tokens frame with every generated
                        // token follows, and brings us up to the server's committed_len. The switch counts as one
                        // seen in its own frame ([serverDecodesNext] reads the flags).
                        if (m.mode != s.mode) {
                            if (m.mode == "centralized") s.movedToServer = true else s.handedToEdge = true
                            stats?.let { it.switches++ }
                        }
                        s.mode = m.mode
                        s.serverLen = m.committedLen
                    }
                    return null
                }
                is ErrorMsg -> {
                    if (m.code == ErrorCode.UNKNOWN_SESSION) return rebuild(c, s)
                    throw WispServerException(m.code, m.message)
                }
                else -> {}
            }
        }
    }

    private companion object {
        fun msSince(t: Long) = (System.nanoTime() - t) / 1e6
        fun ema(old: Double, x: Double, keep: Double) = keep * old + (1 - keep) * x
    }
}
