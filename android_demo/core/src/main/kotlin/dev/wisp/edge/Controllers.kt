package dev.wisp.edge

import org.json.JSONObject
import kotlin.math.exp
import kotlin.math.ln

/**
 * Speculation controllers, a port of `sdk/wisp_sdk/controllers.py` and `predictor.py`.
 *
 * The client drives a round like this:
 *
 *     ctl.startRound(link)
 *     loop: token = propose(); action = ctl.step(tokensSoFar + token)
 *           CONTINUE -> keep the token, feed it to the draft, propose the next one
 *           SEND     -> keep the token and send the round
 *           DROP     -> do not send this token; send the round without it
 *     ... verdict ... ctl.observe(sentTokens, accepted)
 *
 * `Wisp`'s cost model: feeding a kept token costs c ms; a round costs T = drafting + RTT + the server's hinted
 * wait + verify and commits E = 1 + sum_i S_i tokens in expectation (S_i: the first i drafts all survive).
 * Drafting one more is worth it iff S * a_next * T > c * E, so a slow link or a long hinted wait buys more
 * drafting and a fast link less. A token whose predicted acceptance is below `minSend` is not sent.
 */
enum class Action { CONTINUE, SEND, DROP }

/** What the client knows about the link and the server, in ms (EMAs of measurements, plus the last hint). */
data class LinkState(
    var rttMs: Double = 20.0,
    var waitHintMs: Double = 0.0,
    var verifyMs: Double = 5.0,
    var draftMs: Double = 5.0,
    var maxDraft: Int = 16,
)

/** P(the verifier accepts the next draft token): logistic regression over top1, entropy, log1p(position), rate. */
class RejectionPredictor(
    val weights: DoubleArray = DEFAULT_WEIGHTS.copyOf(),
    val bias: Double = DEFAULT_BIAS,
) {
    init {
        require(weights.size == FEATURES.size) { "predictor needs ${FEATURES.size} weights" }
    }

    fun pAccept(top1: Double, entropy: Double, position: Int, rate: Double): Double {
        val x = doubleArrayOf(top1, entropy, ln(1.0 + position), rate)
        var z = bias
        for (i in x.indices) z += weights[i] * x[i]
        return 1.0 / (1.0 + exp(-z.coerceIn(-30.0, 30.0)))
    }

    companion object {
        val FEATURES = listOf("top1", "entropy", "log1p_position", "rate")
        val DEFAULT_WEIGHTS = doubleArrayOf(4.5, -0.25, -0.1, 1.5)
        const val DEFAULT_BIAS = -2.0

        /** From the bundle manifest's `predictor` object (written by `wisp calibrate`); null gives the default. */
        fun fromJson(o: JSONObject?): RejectionPredictor {
            if (o == null) return RejectionPredictor()
            val kind = o.optString("kind", "logistic")
            val feats = o.optJSONArray("features")?.let { a -> List(a.length()) { a.getString(it) } } ?: FEATURES
            require(kind == "logistic" && feats == FEATURES) { "unsupported predictor '$kind' with features $feats" }
            val w = o.getJSONArray("weights")
            return RejectionPredictor(DoubleArray(w.length()) { w.getDouble(it) }, o.getDouble("bias"))
        }
    }
}

abstract class Controller {
    abstract val name: String
    abstract val maxDraft: Int
    var link: LinkState = LinkState()
        protected set

    open fun startRound(link: LinkState) {
        this.link = link
    }

    /** Decide about the last of [tokens] (just proposed; the others are kept). */
    abstract fun step(tokens: List<DraftToken>): Action

    /** Learn from a verdict: [accepted] of [sent] survived. */
    open fun observe(sent: List<DraftToken>, accepted: Int) {}

    companion object {
        /** "wisp" or "fixed:K". */
        fun make(spec: String?, predictor: RejectionPredictor? = null): Controller {
            val s = (spec ?: "wisp").trim().lowercase()
            if (s == "wisp") return Wisp(predictor ?: RejectionPredictor())
            if (s.startsWith("fixed:")) s.substringAfter(':').toIntOrNull()?.let { return FixedK(it) }
            throw IllegalArgumentException("unknown controller '$spec': use wisp or fixed:K")
        }
    }
}

/** The SLED baseline: always draft k tokens, then wait idle for the verdict. */
class FixedK(val k: Int = 4) : Controller() {
    init {
        require(k >= 0) { "k must be >= 0" }
    }

    override val name = "fixed:$k"
    override val maxDraft = k

    override fun step(tokens: List<DraftToken>): Action {
        if (k == 0) return Action.DROP
        return if (tokens.size >= minOf(k, link.maxDraft)) Action.SEND else Action.CONTINUE
    }
}

/** Predictor-driven drafting: stop before a predicted rejection, draft as long as it pays for itself. */
class Wisp(
    val predictor: RejectionPredictor = RejectionPredictor(),
    override val maxDraft: Int = 16,
    val minSend: Double = 0.25,
    rate0: Double = 0.6,
    val rateEma: Double = 0.9,
) : Controller() {
    override val name = "wisp"

    /** The session's running acceptance rate. */
    var rate: Double = rate0
        private set
    private val survive = ArrayList<Double>()

    override fun startRound(link: LinkState) {
        super.startRound(link)
        survive.clear()
    }

    fun pAccept(token: DraftToken, position: Int): Double =
        predictor.pAccept(token.top1, token.entropy, position, rate)

    override fun step(tokens: List<DraftToken>): Action {
        val pos = tokens.size - 1
        val a = pAccept(tokens[pos], pos)
        val sPrev = if (pos > 0 && survive.size >= pos) survive[pos - 1] else 1.0
        val s = sPrev * a
        if (a < minSend) return Action.DROP
        while (survive.size > pos) survive.removeAt(survive.size - 1)
        survive.add(s)
        if (tokens.size >= minOf(maxDraft, link.maxDraft)) return Action.SEND
        val c = maxOf(link.draftMs, 1e-3)
        val expected = 1.0 + survive.sum()
        val roundMs = tokens.size * c + link.rttMs + link.waitHintMs + link.verifyMs
        // The next token's acceptance, before we see it: the session's running rate is the honest prior.
        return if (a >= 0.5 && s * rate * roundMs > c * expected) Action.CONTINUE else Action.SEND
    }

    override fun observe(sent: List<DraftToken>, accepted: Int) {
        // Every accepted token is a 1; the first rejected one a 0; tokens after it were never judged.
        for (i in 0 until minOf(sent.size, accepted + 1)) {
            val ok = if (i < accepted) 1.0 else 0.0
            rate = rateEma * rate + (1 - rateEma) * ok
        }
    }
}
