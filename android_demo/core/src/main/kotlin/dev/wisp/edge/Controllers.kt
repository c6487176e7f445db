package dev.wisp.edge

import org.json.JSONObject
import kotlin.math.exp
import kotlin.math.ln1p

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
 * drafting and a fast link less. With a launch hint F (the verdict's launchInMs: when the server's next joinable
 * step launches) a round of k tokens arriving by F (RTT + k*c <= F) takes T = F + S, else the next launch's
 * F + j*S + S (S = F); tokens before a launch are free, so the rule looks ahead to any k' > k whose rate
 * E(k')/(T(k') + (k'-k)*price) beats E(k)/T(k) (docs/scheduling.md §11). F = 0 is the rule above. A token after the first whose predicted acceptance is below `minSend` is not
 * sent (the first always is: it is free, and its verdict keeps the predictor learning). `Wisp` learns online: every
 * judged token of a verdict is one logistic-regression step on its own copy of the predictor.
 */
enum class Action { CONTINUE, SEND, DROP }

/** What the client knows about the link and the server, in ms (EMAs of measurements, plus the last hint). */
data class LinkState(
    var rttMs: Double = 20.0,
    var waitHintMs: Double = 0.0,
    var verifyMs: Double = 5.0,
    var draftMs: Double = 5.0,
    var maxDraft: Int = 16,
    /** The server's price of one verified token (the last verdict's), in ms. */
    var priceMs: Double = 0.0,
    /** The last verdict's: ms from its sending to the server's next launch a round can join (0: none). */
    var launchInMs: Double = 0.0,
)

/** P(the verifier accepts the next draft token): logistic regression over top1, entropy, log1p(position), rate. */
class RejectionPredictor(
    weights: DoubleArray = DEFAULT_WEIGHTS.copyOf(),
    bias: Double = DEFAULT_BIAS,
) {
    init {
        require(weights.size == FEATURES.size) { "predictor needs ${FEATURES.size} weights" }
    }

    /** The weights; [update] replaces the array (as numpy does), so a copy handed out earlier stays as it was. */
    var weights: DoubleArray = weights.copyOf()
        private set
    var bias: Double = bias
        private set

    /** w . x + bias, summed the way numpy's BLAS dot does it here (a sequential fused multiply-add chain). */
    private fun logit(x: DoubleArray): Double {
        var d = weights[0] * x[0]
        for (i in 1 until x.size) d = Math.fma(weights[i], x[i], d)
        return d + bias
    }

    fun pAccept(top1: Double, entropy: Double, position: Int, rate: Double): Double =
        1.0 / (1.0 + exp(-logit(features(top1, entropy, position, rate)).coerceIn(-30.0, 30.0)))

    /** P(accept) for one feature row (see [features]). */
    fun predict(x: DoubleArray): Double = 1.0 / (1.0 + exp(-logit(x).coerceIn(-30.0, 30.0)))

    /** One online logistic-regression step on one judged token (adapts a prior to the running pair). */
    fun update(x: DoubleArray, y: Double, lr: Double) {
        val err = y - predict(x)
        val g = lr * err
        weights = DoubleArray(weights.size) { weights[it] + g * x[it] }
        bias += lr * err
    }

    /** An independent copy (a controller learns online on its own copy). */
    fun copy(): RejectionPredictor = RejectionPredictor(weights, bias)

    companion object {
        val FEATURES = listOf("top1", "entropy", "log1p_position", "rate")
        val DEFAULT_WEIGHTS = doubleArrayOf(4.5, -0.25, -0.1, 1.5)
        const val DEFAULT_BIAS = -2.0

        fun features(top1: Double, entropy: Double, position: Int, rate: Double): DoubleArray =
            doubleArrayOf(top1, entropy, ln1p(position.toDouble()), rate)

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

    /** How many tokens to draft ahead while the verdict is in flight (0: wait idle). */
    open fun aheadBudget(): Int = 0

    companion object {
        /** "wisp", "wisp+ahead" or "fixed:K". */
        fun make(spec: String?, predictor: RejectionPredictor? = null): Controller {
            val s = (spec ?: "wisp").trim().lowercase()
            if (s == "wisp") return Wisp(predictor ?: RejectionPredictor())
            if (s == "wisp+ahead" || s == "wisp-ahead") return Wisp(predictor ?: RejectionPredictor(), draftAhead = 8)
            if (s.startsWith("fixed:")) s.substringAfter(':').toIntOrNull()?.let { return FixedK(it) }
            throw IllegalArgumentException("unknown controller '$spec': use wisp, wisp+ahead or fixed:K")
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

/**
 * Predictor-driven drafting: stop before a predicted rejection, draft as long as it pays for itself.
 *
 * It works on a private copy of [predictor], which keeps learning from this session's verdicts ([onlineLr]).
 */
class Wisp(
    predictor: RejectionPredictor = RejectionPredictor(),
    override val maxDraft: Int = 16,
    val minSend: Double = 0.25,
    val draftAhead: Int = 0,
    rate0: Double = 0.6,
    val rateEma: Double = 0.9,
    val onlineLr: Double = 0.05,
) : Controller() {
    override val name = "wisp"

    /** This session's predictor (a copy of the one given; it learns online from each verdict). */
    val predictor: RejectionPredictor = predictor.copy()

    /** The session's running acceptance rate. */
    var rate: Double = rate0
        private set
    private val survive = ArrayList<Double>() // S_i for the tokens of the current round
    private val feats = ArrayList<DoubleArray>() // predictor features of the kept tokens, for online learning
    private var endedConfident = false

    override fun startRound(link: LinkState) {
        super.startRound(link)
        survive.clear()
        feats.clear()
        endedConfident = false
    }

    fun pAccept(token: DraftToken, position: Int): Double =
        predictor.pAccept(token.top1, token.entropy, position, rate)

    override fun step(tokens: List<DraftToken>): Action {
        val pos = tokens.size - 1
        val tok = tokens[pos]
        val a = pAccept(tok, pos)
        val sPrev = if (pos > 0 && survive.size >= pos) survive[pos - 1] else 1.0
        val s = sPrev * a
        // The first token is free (its logits come from feeding the committed context, which the next round
        // needs anyway) and sending it is what keeps the predictor learning, so only later ones are withheld.
        if (a < minSend && pos > 0) return Action.DROP
        while (survive.size > pos) survive.removeAt(survive.size - 1)
        while (feats.size > pos) feats.removeAt(feats.size - 1)
        survive.add(s)
        feats.add(RejectionPredictor.features(tok.top1, tok.entropy, pos, rate))
        if (tokens.size >= minOf(maxDraft, link.maxDraft)) {
            endedConfident = a >= 0.5 // cut by the cap while still confident: worth drafting ahead
            return Action.SEND
        }
        var sum = 0.0
        for (v in survive) sum += v
        if (worthMore(tokens.size, s, 1.0 + sum)) return Action.CONTINUE
        endedConfident = a >= 0.5 && s >= 0.5
        return Action.SEND
    }

    /** Predicted round time with k draft tokens, from the verdict leaving the server to the next one. */
    fun roundMs(k: Int): Double {
        val c = maxOf(link.draftMs, 1e-3)
        val f = link.launchInMs
        if (f <= 0.0) return k * c + link.rttMs + link.waitHintMs + link.verifyMs
        val late = link.rttMs + k * c - f // how far after the hinted launch the round would arrive
        val missed = if (late <= 0.0) 0 else Math.ceil(late / f).toInt()
        return f * (missed + 2) // the launch it joins, F + missed*S, plus its step S (S = F)
    }

    /**
     * Does some k' in (k, cap] pay better than sending k tokens now (s: their survival, E(k) = expected)? The
     * next tokens' acceptance is the session's running rate; the server's price is paid for every verified token.
     */
    private fun worthMore(k: Int, s: Double, expected: Double): Boolean {
        val c = maxOf(link.draftMs, 1e-3)
        val price = maxOf(0.0, link.priceMs)
        // No launch hint: the price rule itself (one token of look-ahead is exact; the file's comment says why)
        if (link.launchInMs <= 0.0) return s * rate * roundMs(k) > (c + price) * expected
        val cap = minOf(maxDraft, link.maxDraft)
        val base = roundMs(k)
        var gain = 0.0
        var surv = s
        for (extra in 1..(cap - k)) {
            surv *= rate
            gain += surv
            // E(k')/(T(k') + extra*price) > E(k)/T(k), cross-multiplied (both times are positive)
            if ((expected + gain) * base > expected * (roundMs(k + extra) + extra * price)) return true
        }
        return false
    }

    override fun observe(sent: List<DraftToken>, accepted: Int) {
        // Every accepted token is a 1; the first rejected one a 0; tokens after it were never judged.
        for (i in 0 until minOf(sent.size, accepted + 1)) {
            val ok = if (i < accepted) 1.0 else 0.0
            rate = rateEma * rate + (1 - rateEma) * ok
            if (onlineLr != 0.0 && i < feats.size) predictor.update(feats[i], ok, onlineLr)
        }
    }

    override fun aheadBudget(): Int {
        if (draftAhead == 0 || !endedConfident) return 0
        // Only as many tokens as fit in the expected wait: beyond that they would delay the next round.
        val expectedWait = link.rttMs + link.waitHintMs + link.verifyMs
        return maxOf(0, minOf(draftAhead, (expectedWait / maxOf(link.draftMs, 1e-3)).toInt()))
    }
}
