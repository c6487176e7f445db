package dev.wisp.edge

import java.io.IOException
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit

/** A deterministic "target model": the next token is a hash of the last few tokens. */
class FakeTarget(val vocab: Int = 97, val eos: Int = 3) {
    fun next(context: List<Int>): Int {
        var h = context.size * 7919
        for (t in context.takeLast(3)) h = h * 31 + t
        val tok = Math.floorMod(h, vocab)
        return if (tok == eos) tok + 1 else tok // EOS only through max_new_tokens in these tests
    }

    fun greedy(prompt: List<Int>, maxNew: Int): List<Int> {
        val ctx = prompt.toMutableList()
        repeat(maxNew) { ctx.add(next(ctx)) }
        return ctx.subList(prompt.size, ctx.size).toList()
    }
}

/** A draft that agrees with the target except where a hash says otherwise (and then is unsure). */
class FakeDraft(private val target: FakeTarget, private val disagreeEvery: Int = 4) : DraftModel {
    val cached = ArrayList<Int>()
    var forwards = 0
    override val vocabSize get() = target.vocab

    override fun sync(context: IntArray) {
        var common = 0
        while (common < cached.size && common < context.size && cached[common] == context[common]) common++
        while (cached.size > common) cached.removeAt(cached.size - 1)
        for (i in common until context.size) cached.add(context[i])
        forwards++
    }

    override fun advance(token: Int) {
        cached.add(token)
        forwards++
    }

    override fun nextLogits(): FloatArray {
        val t = target.next(cached)
        val wrong = Math.floorMod(cached.sum() * 13 + cached.size, disagreeEvery) == 0
        val logits = FloatArray(vocab) { 0f }
        if (wrong) {
            logits[(t + 1) % vocab] = 1.0f // a flat, wrong guess
            logits[t] = 0.8f
        } else {
            logits[t] = 9f
        }
        return logits
    }

    private val vocab get() = target.vocab
}

/**
 * An in-process verifier speaking the real wire format (frames are encoded and decoded both ways), with fault
 * injection: drop the connection when a given round arrives, before or after applying it, or forget sessions.
 */
class FakeServer(val target: FakeTarget = FakeTarget(), val fingerprint: String = "sha256:fake") : Transport {
    class Sess(val id: String, val tokens: MutableList<Int>, val promptLen: Int, val maxNew: Int, val stop: Set<Int>) {
        var lastRound = 0
        var lastVerdict: Verdict? = null
        var done = false
        var mode = "speculative" // "centralized" while the fake decodes it (Resumed.mode)
    }

    val sessions = HashMap<String, Sess>()
    val roundsSeen = ArrayList<Round>()
    val opens = ArrayList<Open>()
    var connects = 0
    private var nextId = 1

    /** Drop the connection when this round number arrives; applyFirst: after applying it (the verdict is lost). */
    var dropAtRound: Int? = null
    var dropApplyFirst = false
    /** Forget every session when this round arrives (the client must rebuild). */
    var forgetAtRound: Int? = null
    /** Refuse this many connection attempts. */
    var refuseConnects = 0
    /** The hybrid, forced: every [hybridEvery]-th round's verdict centralizes the session, the fake decodes
     * [hybridEvery] tokens itself (Tokens frames), then hands it back (Switch). 0: never. */
    var hybridEvery = 0
    /** Take an Open's `start_on_server` offer: answer `Opened(mode = "centralized")`, decode this many tokens
     * itself (Tokens frames), then hand the session to the edge (Switch), as `wisp serve --regime` does. 0: never. */
    var startOnServerTokens = 0
    /** The regime decodes the fleet: a round's verdict centralizes its session and a taken offer's session is
     * decoded to the end, never handed back (as `wisp serve --decode-all`). */
    var decodeAll = false
    /** Verify at most this many draft tokens of a round (the rest is `unverified`). */
    var verifyCap: Int? = null
    /** Every verdict's draft_cap: the most draft tokens the next round should carry (0: no cap). */
    var draftCap = 0

    inner class Conn : Connection {
        val inbox = LinkedBlockingQueue<Frame>()
        @Volatile var gone = false

        override fun send(text: String) {
            if (gone) throw ConnectionLost("gone")
            handle(this, Codec.decodeClient(text))
        }

        override fun send(bytes: ByteArray) {
            if (gone) throw ConnectionLost("gone")
            handleRound(this, Round.decode(bytes))
        }

        override fun receive(timeoutMs: Long): Frame? = inbox.poll(timeoutMs, TimeUnit.MILLISECONDS)

        override fun close() {
            gone = true
        }

        fun reply(m: ServerMessage) {
            when (val e = Codec.encodeServer(m)) {
                is ByteArray -> inbox.put(Frame.Binary(e))
                is String -> inbox.put(Frame.Text(e))
            }
        }

        fun drop() {
            gone = true
            inbox.put(Frame.Gone("dropped by the fake server"))
        }
    }

    override fun connect(timeoutMs: Long): Connection {
        connects++
        if (refuseConnects > 0) {
            refuseConnects--
            throw IOException("connection refused")
        }
        return Conn()
    }

    @Synchronized
    private fun handle(c: Conn, m: ClientMessage) {
        when (m) {
            is Hello -> if (m.tokenizerFingerprint != fingerprint) {
                c.reply(ErrorMsg(ErrorCode.TOKENIZER_MISMATCH, "draft tokenizer does not match the target"))
            } else {
                c.reply(Welcome(Limits(1 shl 20, 8, 4096, 4), policy = "fake"))
            }
            is Open -> {
                opens.add(m)
                val id = "%032x".format(nextId++)
                val s = Sess(id, (m.promptIds + m.committedIds).toMutableList(), m.promptIds.size, m.maxNewTokens, m.stopTokenIds.toSet())
                sessions[id] = s
                val t = commit(s, target.next(s.tokens))
                val taken = m.startOnServer && (startOnServerTokens > 0 || decodeAll) && !s.done
                c.reply(Opened(id, s.tokens.size, t, s.done, mode = if (taken) "centralized" else "speculative"))
                if (taken) decodeThenSwitch(c, s, if (decodeAll) Int.MAX_VALUE else startOnServerTokens)
            }
            is Resume -> {
                val s = sessions[m.sessionId]
                if (s == null) c.reply(ErrorMsg(ErrorCode.UNKNOWN_SESSION, "no such session", m.sessionId))
                else {
                    c.reply(Resumed(s.id, s.tokens.size, s.lastRound, s.mode))
                    if (s.mode == "centralized") { // as wisp serve: every generated token again, then decoding on
                        c.reply(Tokens(s.id, s.tokens.subList(s.promptLen, s.tokens.size).toList(), s.tokens.size, s.done))
                        decodeThenSwitch(c, s, if (decodeAll) Int.MAX_VALUE else hybridEvery)
                    }
                }
            }
            is Close -> {
                sessions.remove(m.sessionId)
                c.reply(Closed(m.sessionId))
            }
        }
    }

    private fun commit(s: Sess, token: Int): Int {
        s.tokens.add(token)
        if (s.tokens.size - s.promptLen >= s.maxNew || token in s.stop) s.done = true
        return token
    }

    @Synchronized
    private fun handleRound(c: Conn, r: Round) {
        roundsSeen.add(r)
        if (forgetAtRound == r.round) {
            forgetAtRound = null
            sessions.clear()
        }
        if (dropAtRound == r.round && !dropApplyFirst) {
            dropAtRound = null
            c.drop()
            return
        }
        val s = sessions[r.sessionId]
        if (s == null) {
            c.reply(ErrorMsg(ErrorCode.UNKNOWN_SESSION, "no such session", r.sessionId, r.round))
            return
        }
        if (r.round == s.lastRound && s.lastVerdict != null) {
            c.reply(s.lastVerdict!!) // idempotent re-send
            return
        }
        if (r.round != s.lastRound + 1 || r.committedLen != s.tokens.size) {
            c.reply(ErrorMsg(ErrorCode.BAD_REQUEST, "round ${r.round} / committed_len ${r.committedLen} out of step", s.id, r.round))
            return
        }
        require(r.draftIds.size <= 8) { "draft longer than the limit" }
        val remaining = s.maxNew - (s.tokens.size - s.promptLen)
        var accepted = 0
        val verified = minOf(r.draftIds.size, verifyCap ?: r.draftIds.size)
        for (d in r.draftIds.subList(0, verified)) {
            if (accepted >= remaining - 1 || target.next(s.tokens) != d) break
            s.tokens.add(d)
            accepted++
        }
        val next = commit(s, target.next(s.tokens))
        val centralize = (decodeAll || hybridEvery > 0 && r.round % hybridEvery == 0) && !s.done
        val v = Verdict(
            s.id, r.round, s.tokens.size, accepted, next, s.done, 0.5f, 1.0f, 2.0f,
            priceMs = 3.0f, unverified = r.draftIds.size - verified, centralize = centralize, draftCap = draftCap,
        )
        s.lastRound = r.round
        s.lastVerdict = v
        if (centralize) s.mode = "centralized"
        if (dropAtRound == r.round) { // applied, but the verdict never arrives
            dropAtRound = null
            c.drop()
            return
        }
        c.reply(v)
        if (centralize) decodeThenSwitch(c, s, if (decodeAll) Int.MAX_VALUE else hybridEvery)
    }

    /** A stretch of server-side decoding: `n` tokens as Tokens frames, then a Switch back to the edge. */
    private fun decodeThenSwitch(c: Conn, s: Sess, n: Int) {
        var left = n
        while (left-- > 0 && !s.done) {
            val t = commit(s, target.next(s.tokens))
            c.reply(Tokens(s.id, listOf(t), s.tokens.size, s.done))
        }
        if (!s.done) {
            s.mode = "speculative"
            c.reply(Switch(s.id, s.tokens.size))
        }
    }
}

/** `assertThrows` for Kotlin (JUnit's Kotlin extension is not in Debian's console jar). */
inline fun <reified T : Throwable> expectThrows(block: () -> Unit): T {
    try {
        block()
    } catch (e: Throwable) {
        if (e is T) return e
        throw AssertionError("expected ${T::class.java.simpleName}, got $e", e)
    }
    throw AssertionError("expected ${T::class.java.simpleName}, nothing was thrown")
}
