package dev.wisp.edge

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * The WISP wire protocol (`wisp.v1`), a port of `sdk/wisp_sdk/protocol.py`, which is the source of truth.
 *
 * Control messages are JSON text frames; `Round` (edge -> cloud) and `Verdict` (cloud -> edge) are binary frames,
 * little-endian:
 *
 *     header   B version, B kind, H flags                                      (4 bytes)
 *     Round    16s session, I round, I committed_len, H n_draft,
 *              n_draft * i token,
 *              [if FLAG_SPARSE_Q] per draft position: H nnz, nnz * i id, nnz * f prob
 *              [if FLAG_SIBLINGS] H n_sib, n_sib * i token (token trees: this client sends none)
 *     Verdict  16s session, I round, I committed_len, H accepted, i next_token,
 *              f queue_ms, f verify_ms, f wait_hint_ms, f price_ms, H unverified, H draft_cap, f launch_in_ms
 *
 * The shared test vectors (`core/src/test/resources/vectors.json`, written by `tools/make_vectors.py` from the
 * Python module) keep the two implementations from drifting.
 */
object Protocol {
    // 2: Verdict price/unverified/FLAG_CENTRALIZE, Switch, Resumed.mode; 3: Verdict launch_in_ms;
    // 4: Verdict draft_cap; 5: token trees (Round sibling_ids, Verdict FLAG_SIBLING, Limits.max_siblings),
    // which this client does not draft: it sends chains, and refuses a verdict that names a sibling
    const val VERSION = 5
    const val SUBPROTOCOL = "wisp.v1"
    const val FLAG_SPARSE_Q = 1
    const val FLAG_EOS = 1
    const val FLAG_CENTRALIZE = 2 // Verdict: the server decodes this session from now on (Tokens follow)
    const val FLAG_SIBLING = 4 // Verdict: a sibling token was committed (only for rounds that carry siblings)
    const val KIND_ROUND = 1
    const val KIND_VERDICT = 2
    const val HEADER_BYTES = 4
    const val ROUND_FIXED_BYTES = 16 + 4 + 4 + 2
    const val VERDICT_BYTES = HEADER_BYTES + 16 + 4 + 4 + 2 + 4 + 4 + 4 + 4 + 4 + 2 + 2 + 4
}

class ProtocolException(message: String, cause: Throwable? = null) : RuntimeException(message, cause)

enum class ErrorCode(val wire: String) {
    BAD_REQUEST("bad_request"),
    UNAUTHORIZED("unauthorized"),
    TOO_LARGE("too_large"),
    UNKNOWN_SESSION("unknown_session"),
    TOKENIZER_MISMATCH("tokenizer_mismatch"),
    OVERLOADED("overloaded"),
    INTERNAL("internal");

    companion object {
        fun fromWire(s: String): ErrorCode =
            values().firstOrNull { it.wire == s } ?: throw ProtocolException("unknown error code '$s'")
    }
}

/** temperature 0 means greedy. topK 0 and topP 1.0 disable those filters. */
data class SamplingParams(
    val temperature: Double = 0.0,
    val topP: Double = 1.0,
    val topK: Int = 0,
    val seed: Long? = null,
) {
    val greedy: Boolean get() = temperature == 0.0

    init {
        require(temperature in 0.0..100.0) { "temperature must be in [0, 100]" }
        require(topP > 0.0 && topP <= 1.0) { "top_p must be in (0, 1]" }
        require(topK >= 0) { "top_k must be >= 0" }
    }

    fun toJson(): JSONObject = JSONObject().apply {
        put("temperature", temperature)
        put("top_p", topP)
        put("top_k", topK)
        if (seed != null) put("seed", seed)
    }

    companion object {
        fun fromJson(o: JSONObject) = SamplingParams(
            temperature = o.optDouble("temperature", 0.0),
            topP = o.optDouble("top_p", 1.0),
            topK = o.optInt("top_k", 0),
            seed = if (o.has("seed") && !o.isNull("seed")) o.getLong("seed") else null,
        )
    }
}

/** Latency targets the device asks for: time to first token and time per output token, in ms. */
data class Slo(val ttftMs: Double = 2000.0, val tpotMs: Double = 200.0) {
    fun toJson(): JSONObject = JSONObject().put("ttft_ms", ttftMs).put("tpot_ms", tpotMs)

    companion object {
        fun fromJson(o: JSONObject) = Slo(o.optDouble("ttft_ms", 2000.0), o.optDouble("tpot_ms", 200.0))
    }
}

data class Limits(
    val maxFrameBytes: Int,
    val maxDraftLen: Int,
    val maxContextLen: Int,
    val maxSessionsPerToken: Int,
    val maxSiblings: Int = 0,
) {
    fun toJson(): JSONObject = JSONObject()
        .put("max_frame_bytes", maxFrameBytes)
        .put("max_draft_len", maxDraftLen)
        .put("max_context_len", maxContextLen)
        .put("max_sessions_per_token", maxSessionsPerToken)
        .put("max_siblings", maxSiblings)

    companion object {
        fun fromJson(o: JSONObject) = Limits(
            o.reqInt("max_frame_bytes"), o.reqInt("max_draft_len"),
            o.reqInt("max_context_len"), o.reqInt("max_sessions_per_token"),
            o.optInt("max_siblings", 0),
        )
    }
}

// ---- client -> server ----

sealed interface ClientMessage {
    fun toJson(): JSONObject
    fun encode(): String = toJson().toString()
}

data class Hello(
    val tokenizerFingerprint: String,
    val authToken: String? = null,
    val client: String = "wisp-android",
    val protocolVersion: Int = Protocol.VERSION,
) : ClientMessage {
    override fun toJson(): JSONObject = JSONObject().apply {
        put("type", "hello")
        put("protocol_version", protocolVersion)
        put("tokenizer_fingerprint", tokenizerFingerprint)
        if (authToken != null) put("auth_token", authToken)
        put("client", client)
    }
}

/**
 * `startOnServer`: a speculative session offers to be decoded by the server while the device's draft prefills the
 * prompt; a server that takes it (only `wisp serve --regime`) answers `Opened(mode = "centralized")`, streams
 * `Tokens` and hands the session to the edge with a `Switch`.
 */
data class Open(
    val promptIds: List<Int>,
    val committedIds: List<Int> = emptyList(),
    val maxNewTokens: Int = 256,
    val sampling: SamplingParams = SamplingParams(),
    val slo: Slo = Slo(),
    val mode: String = "speculative",
    val stopTokenIds: List<Int> = emptyList(),
    val startOnServer: Boolean = false,
) : ClientMessage {
    init {
        require(promptIds.isNotEmpty()) { "prompt_ids must not be empty" }
        require(maxNewTokens >= 1) { "max_new_tokens must be >= 1" }
        require(mode == "speculative" || mode == "centralized") { "mode must be speculative or centralized" }
    }

    override fun toJson(): JSONObject = JSONObject().apply {
        put("type", "open")
        put("prompt_ids", promptIds.toJsonArray())
        put("committed_ids", committedIds.toJsonArray())
        put("max_new_tokens", maxNewTokens)
        put("sampling", sampling.toJson())
        put("slo", slo.toJson())
        put("mode", mode)
        put("stop_token_ids", stopTokenIds.toJsonArray())
        put("start_on_server", startOnServer)
    }
}

data class Resume(val sessionId: String) : ClientMessage {
    override fun toJson(): JSONObject = JSONObject().put("type", "resume").put("session_id", sessionId)
}

data class Close(val sessionId: String) : ClientMessage {
    override fun toJson(): JSONObject = JSONObject().put("type", "close").put("session_id", sessionId)
}

// ---- server -> client ----

sealed interface ServerMessage

data class Welcome(
    val limits: Limits,
    val protocolVersion: Int = Protocol.VERSION,
    val server: String = "wisp-cloud",
    val policy: String = "fifo",
) : ServerMessage {
    fun toJson(): JSONObject = JSONObject()
        .put("type", "welcome").put("protocol_version", protocolVersion)
        .put("server", server).put("policy", policy).put("limits", limits.toJson())
}

/**
 * `mode`: how the session starts: "centralized" for one opened so, or for a speculative one whose `start_on_server`
 * offer the server took (`Tokens` follow until a `Switch` hands it to the edge).
 */
data class Opened(
    val sessionId: String,
    val committedLen: Int,
    val nextToken: Int,
    val done: Boolean = false,
    val prefillMs: Double = 0.0,
    val queueMs: Double = 0.0,
    val waitHintMs: Double = 0.0,
    val mode: String = "speculative",
) : ServerMessage {
    fun toJson(): JSONObject = JSONObject()
        .put("type", "opened").put("session_id", sessionId).put("committed_len", committedLen)
        .put("next_token", nextToken).put("done", done).put("prefill_ms", prefillMs)
        .put("queue_ms", queueMs).put("wait_hint_ms", waitHintMs).put("mode", mode)
}

/** `mode`: how the session generates now (the server may have switched it while the link was down). */
data class Resumed(
    val sessionId: String,
    val committedLen: Int,
    val lastRound: Int,
    val mode: String = "speculative",
) : ServerMessage {
    fun toJson(): JSONObject = JSONObject()
        .put("type", "resumed").put("session_id", sessionId)
        .put("committed_len", committedLen).put("last_round", lastRound).put("mode", mode)
}

/** The server hands a centralized-decoded session back to the edge: draft again from `committedLen`. */
data class Switch(val sessionId: String, val committedLen: Int, val mode: String = "speculative") : ServerMessage {
    fun toJson(): JSONObject = JSONObject()
        .put("type", "switch").put("session_id", sessionId).put("mode", mode).put("committed_len", committedLen)
}

data class Tokens(
    val sessionId: String,
    val tokens: List<Int>,
    val committedLen: Int,
    val done: Boolean = false,
) : ServerMessage {
    fun toJson(): JSONObject = JSONObject()
        .put("type", "tokens").put("session_id", sessionId).put("tokens", tokens.toJsonArray())
        .put("committed_len", committedLen).put("done", done)
}

data class Closed(val sessionId: String) : ServerMessage {
    fun toJson(): JSONObject = JSONObject().put("type", "closed").put("session_id", sessionId)
}

data class ErrorMsg(
    val code: ErrorCode,
    val message: String,
    val sessionId: String? = null,
    val round: Int? = null,
) : ServerMessage {
    fun toJson(): JSONObject = JSONObject().apply {
        put("type", "error"); put("code", code.wire); put("message", message)
        if (sessionId != null) put("session_id", sessionId)
        if (round != null) put("round", round)
    }
}

// ---- binary hot path ----

/** Draft tokens for one verification; `qIds[i]`/`qProbs[i]` is the draft's sampling distribution at position i. */
data class Round(
    val sessionId: String,
    val round: Int,
    val committedLen: Int,
    val draftIds: List<Int>,
    val qIds: List<IntArray>? = null,
    val qProbs: List<FloatArray>? = null,
) {
    init {
        require(round >= 0) { "round must be >= 0" }
        require(committedLen >= 1) { "committed_len must be >= 1" }
    }

    fun encode(): ByteArray {
        val sparse = qIds != null
        var size = Protocol.HEADER_BYTES + Protocol.ROUND_FIXED_BYTES + 4 * draftIds.size
        if (sparse) {
            val probs = qProbs
            if (probs == null || qIds.size != draftIds.size || probs.size != draftIds.size) {
                throw ProtocolException("q_ids and q_probs need one entry per draft token")
            }
            for (i in draftIds.indices) {
                if (qIds[i].size != probs[i].size) throw ProtocolException("q_ids and q_probs lengths differ")
                size += 2 + 8 * qIds[i].size
            }
        }
        val buf = ByteBuffer.allocate(size).order(ByteOrder.LITTLE_ENDIAN)
        buf.put(Protocol.VERSION.toByte()).put(Protocol.KIND_ROUND.toByte())
        buf.putShort((if (sparse) Protocol.FLAG_SPARSE_Q else 0).toShort())
        buf.put(sessionIdBytes(sessionId))
        buf.putInt(round).putInt(committedLen).putShort(u16(draftIds.size, "n_draft"))
        for (t in draftIds) buf.putInt(t)
        if (sparse) {
            for (i in draftIds.indices) {
                val ids = qIds[i]
                val ps = qProbs!![i]
                buf.putShort(u16(ids.size, "nnz"))
                for (t in ids) buf.putInt(t)
                for (p in ps) buf.putFloat(p)
            }
        }
        return buf.array()
    }

    override fun equals(other: Any?): Boolean {
        if (other !is Round) return false
        return sessionId == other.sessionId && round == other.round && committedLen == other.committedLen &&
            draftIds == other.draftIds && sameNested(qIds, other.qIds) { a, b -> a.contentEquals(b) } &&
            sameNested(qProbs, other.qProbs) { a, b -> a.contentEquals(b) }
    }

    override fun hashCode(): Int = sessionId.hashCode() * 31 + round * 17 + draftIds.hashCode()

    companion object {
        fun decode(data: ByteArray): Round {
            val flags = readHeader(data, Protocol.KIND_ROUND)
            val buf = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN)
            buf.position(Protocol.HEADER_BYTES)
            if (buf.remaining() < Protocol.ROUND_FIXED_BYTES) throw ProtocolException("round frame truncated")
            val sid = readSessionId(buf)
            val rnd = buf.int
            val committed = buf.int
            val n = buf.short.toInt() and 0xFFFF
            if (buf.remaining() < 4 * n) throw ProtocolException("round frame truncated in draft tokens")
            val draft = List(n) { buf.int }
            var qIds: MutableList<IntArray>? = null
            var qProbs: MutableList<FloatArray>? = null
            if (flags and Protocol.FLAG_SPARSE_Q != 0) {
                qIds = ArrayList(n)
                qProbs = ArrayList(n)
                repeat(n) {
                    if (buf.remaining() < 2) throw ProtocolException("round frame truncated in draft distribution")
                    val nnz = buf.short.toInt() and 0xFFFF
                    if (buf.remaining() < 8 * nnz) {
                        throw ProtocolException("round frame truncated in draft distribution")
                    }
                    qIds.add(IntArray(nnz) { buf.int })
                    qProbs.add(FloatArray(nnz) { buf.float })
                }
            }
            if (buf.remaining() != 0) throw ProtocolException("round frame has ${buf.remaining()} trailing bytes")
            return Round(sid, rnd, committed, draft, qIds, qProbs)
        }
    }
}

data class Verdict(
    val sessionId: String,
    val round: Int,
    /** After this verdict: previous + accepted + 1. */
    val committedLen: Int,
    val accepted: Int,
    val nextToken: Int,
    val done: Boolean = false,
    val queueMs: Float = 0f,
    val verifyMs: Float = 0f,
    val waitHintMs: Float = 0f,
    /** The server's marginal GPU cost of one verified token now, in ms (0 when idle). */
    val priceMs: Float = 0f,
    /** Draft tokens past the verified prefix: never judged (not a rejection). */
    val unverified: Int = 0,
    /** FLAG_CENTRALIZE: the server decodes this session from now on; Tokens follow, send no rounds. */
    val centralize: Boolean = false,
    /** Ms from this verdict leaving the server to the next launch a new round can join (0: none running). */
    val launchInMs: Float = 0f,
    /** The most draft tokens the server wants in the next round (0: no cap beyond the Welcome's limit). */
    val draftCap: Int = 0,
) : ServerMessage {
    fun encode(): ByteArray {
        val buf = ByteBuffer.allocate(Protocol.VERDICT_BYTES).order(ByteOrder.LITTLE_ENDIAN)
        buf.put(Protocol.VERSION.toByte()).put(Protocol.KIND_VERDICT.toByte())
        val flags = (if (done) Protocol.FLAG_EOS else 0) or (if (centralize) Protocol.FLAG_CENTRALIZE else 0)
        buf.putShort(flags.toShort())
        buf.put(sessionIdBytes(sessionId))
        buf.putInt(round).putInt(committedLen).putShort(u16(accepted, "accepted")).putInt(nextToken)
        buf.putFloat(queueMs).putFloat(verifyMs).putFloat(waitHintMs).putFloat(priceMs)
        buf.putShort(u16(unverified, "unverified")).putShort(u16(draftCap, "draft_cap"))
        buf.putFloat(launchInMs)
        return buf.array()
    }

    companion object {
        fun decode(data: ByteArray): Verdict {
            val flags = readHeader(data, Protocol.KIND_VERDICT)
            if (data.size != Protocol.VERDICT_BYTES) throw ProtocolException("verdict frame has the wrong size")
            if (flags and Protocol.FLAG_SIBLING != 0) {
                throw ProtocolException("verdict commits a sibling token, but this client sends no siblings")
            }
            val buf = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN)
            buf.position(Protocol.HEADER_BYTES)
            val sid = readSessionId(buf)
            val v = Verdict(
                sessionId = sid,
                round = buf.int,
                committedLen = buf.int,
                accepted = buf.short.toInt() and 0xFFFF,
                nextToken = buf.int,
                done = flags and Protocol.FLAG_EOS != 0,
                queueMs = buf.float,
                verifyMs = buf.float,
                waitHintMs = buf.float,
                priceMs = buf.float,
                unverified = buf.short.toInt() and 0xFFFF,
                centralize = flags and Protocol.FLAG_CENTRALIZE != 0,
                draftCap = buf.short.toInt() and 0xFFFF, // named arguments are read in this order
                launchInMs = buf.float,
            )
            if (!(v.launchInMs >= 0f)) { // negative or NaN
                throw ProtocolException("verdict launch_in_ms must be >= 0, got ${v.launchInMs}")
            }
            return v
        }
    }
}

/** Encoding and decoding of whole frames, in both directions (the server side is for tests and fakes). */
object Codec {
    /** Decode a frame the client received (text: JSON control message; binary: Verdict). */
    fun decodeServer(text: String): ServerMessage {
        val o = parseObject(text)
        return try {
            when (val type = o.reqString("type")) {
                "welcome" -> Welcome(
                    limits = Limits.fromJson(o.reqObject("limits")),
                    protocolVersion = o.optInt("protocol_version", Protocol.VERSION),
                    server = o.optString("server", "wisp-cloud"),
                    policy = o.optString("policy", "fifo"),
                )
                "opened" -> Opened(
                    sessionId = o.reqString("session_id"),
                    committedLen = o.reqInt("committed_len"),
                    nextToken = o.reqInt("next_token"),
                    done = o.optBoolean("done", false),
                    prefillMs = o.optDouble("prefill_ms", 0.0),
                    queueMs = o.optDouble("queue_ms", 0.0),
                    waitHintMs = o.optDouble("wait_hint_ms", 0.0),
                    mode = o.optString("mode", "speculative"),
                )
                "resumed" -> Resumed(
                    o.reqString("session_id"), o.reqInt("committed_len"), o.reqInt("last_round"),
                    o.optString("mode", "speculative"),
                )
                "switch" -> Switch(o.reqString("session_id"), o.reqInt("committed_len"), o.optString("mode", "speculative"))
                "tokens" -> Tokens(
                    o.reqString("session_id"), o.reqIntList("tokens"), o.reqInt("committed_len"),
                    o.optBoolean("done", false),
                )
                "closed" -> Closed(o.reqString("session_id"))
                "error" -> ErrorMsg(
                    code = ErrorCode.fromWire(o.reqString("code")),
                    message = o.reqString("message"),
                    sessionId = if (o.has("session_id") && !o.isNull("session_id")) o.getString("session_id") else null,
                    round = if (o.has("round") && !o.isNull("round")) o.getInt("round") else null,
                )
                else -> throw ProtocolException("unknown server message type '$type'")
            }
        } catch (e: JSONException) {
            throw ProtocolException("invalid server message: ${e.message}", e)
        }
    }

    fun decodeServer(binary: ByteArray): ServerMessage = Verdict.decode(binary)

    /** Decode a frame the server received (for fakes and tests). */
    fun decodeClient(text: String): ClientMessage {
        val o = parseObject(text)
        return try {
            when (val type = o.reqString("type")) {
                "hello" -> Hello(
                    tokenizerFingerprint = o.reqString("tokenizer_fingerprint"),
                    authToken = if (o.has("auth_token") && !o.isNull("auth_token")) o.getString("auth_token") else null,
                    client = o.optString("client", "wisp-sdk"),
                    protocolVersion = o.optInt("protocol_version", Protocol.VERSION),
                )
                "open" -> Open(
                    promptIds = o.reqIntList("prompt_ids"),
                    committedIds = if (o.has("committed_ids")) o.reqIntList("committed_ids") else emptyList(),
                    maxNewTokens = o.optInt("max_new_tokens", 256),
                    sampling = o.optJSONObject("sampling")?.let { SamplingParams.fromJson(it) } ?: SamplingParams(),
                    slo = o.optJSONObject("slo")?.let { Slo.fromJson(it) } ?: Slo(),
                    mode = o.optString("mode", "speculative"),
                    stopTokenIds = if (o.has("stop_token_ids")) o.reqIntList("stop_token_ids") else emptyList(),
                    startOnServer = o.optBoolean("start_on_server", false),
                )
                "resume" -> Resume(o.reqString("session_id"))
                "close" -> Close(o.reqString("session_id"))
                else -> throw ProtocolException("unknown client message type '$type'")
            }
        } catch (e: JSONException) {
            throw ProtocolException("invalid client message: ${e.message}", e)
        } catch (e: IllegalArgumentException) {
            throw ProtocolException("invalid client message: ${e.message}", e)
        }
    }

    fun encodeServer(msg: ServerMessage): Any = when (msg) {
        is Verdict -> msg.encode()
        is Welcome -> msg.toJson().toString()
        is Opened -> msg.toJson().toString()
        is Resumed -> msg.toJson().toString()
        is Tokens -> msg.toJson().toString()
        is Switch -> msg.toJson().toString()
        is Closed -> msg.toJson().toString()
        is ErrorMsg -> msg.toJson().toString()
    }
}

// ---- helpers ----

private fun parseObject(text: String): JSONObject = try {
    JSONObject(text)
} catch (e: JSONException) {
    throw ProtocolException("frame is not valid JSON: ${e.message}", e)
}

private fun JSONObject.reqString(k: String): String {
    if (!has(k) || isNull(k)) throw ProtocolException("invalid message ($k: field required)")
    val v = get(k)
    if (v !is String) throw ProtocolException("invalid message ($k: not a string)")
    return v
}

private fun JSONObject.reqInt(k: String): Int {
    if (!has(k) || isNull(k)) throw ProtocolException("invalid message ($k: field required)")
    val v = get(k)
    if (v !is Number) throw ProtocolException("invalid message ($k: not a number)")
    val d = v.toDouble()
    if (d != Math.floor(d)) throw ProtocolException("invalid message ($k: not an integer)")
    return v.toInt()
}

private fun JSONObject.reqObject(k: String): JSONObject =
    optJSONObject(k) ?: throw ProtocolException("invalid message ($k: object required)")

private fun JSONObject.reqIntList(k: String): List<Int> {
    val a = optJSONArray(k) ?: throw ProtocolException("invalid message ($k: list required)")
    return List(a.length()) { i ->
        val v = a.get(i)
        if (v !is Number) throw ProtocolException("invalid message ($k.$i: not an integer)")
        v.toInt()
    }
}

private fun List<Int>.toJsonArray(): JSONArray = JSONArray().also { arr -> forEach { arr.put(it) } }

private fun u16(v: Int, what: String): Short {
    if (v < 0 || v > 0xFFFF) throw ProtocolException("$what $v does not fit in a u16")
    return v.toShort()
}

internal fun sessionIdBytes(sessionId: String): ByteArray {
    if (sessionId.length != 32) throw ProtocolException("session id must be 32 hex chars, got '$sessionId'")
    return ByteArray(16) { i ->
        val hi = Character.digit(sessionId[2 * i], 16)
        val lo = Character.digit(sessionId[2 * i + 1], 16)
        if (hi < 0 || lo < 0) throw ProtocolException("session id must be 32 hex chars, got '$sessionId'")
        ((hi shl 4) or lo).toByte()
    }
}

private fun readSessionId(buf: ByteBuffer): String {
    val sb = StringBuilder(32)
    repeat(16) {
        val b = buf.get().toInt() and 0xFF
        sb.append(Character.forDigit(b shr 4, 16)).append(Character.forDigit(b and 0xF, 16))
    }
    return sb.toString()
}

private fun readHeader(data: ByteArray, wantKind: Int): Int {
    if (data.size < Protocol.HEADER_BYTES) throw ProtocolException("binary frame shorter than its header")
    val version = data[0].toInt() and 0xFF
    val kind = data[1].toInt() and 0xFF
    val flags = (data[2].toInt() and 0xFF) or ((data[3].toInt() and 0xFF) shl 8)
    if (version != Protocol.VERSION) {
        throw ProtocolException("binary frame of protocol version $version, expected ${Protocol.VERSION}")
    }
    if (kind != wantKind) throw ProtocolException("unexpected binary frame kind $kind")
    return flags
}

private inline fun <T> sameNested(a: List<T>?, b: List<T>?, eq: (T, T) -> Boolean): Boolean {
    if (a == null || b == null) return a == null && b == null
    if (a.size != b.size) return false
    return a.indices.all { eq(a[it], b[it]) }
}
