package dev.wisp.edge

/**
 * The small draft model on the device, with a KV cache that lives across rounds (the same contract as the Python
 * SDK's `DraftRunner`).
 *
 * Every round the client calls [sync] with the committed context: the model keeps the longest cached prefix that
 * still matches (after a rejection that is the committed length), rolls its KV cache back to it with no re-prefill,
 * and feeds only the tokens it has not seen. [nextLogits] are then the logits for the token after the cached
 * context, and [advance] feeds one drafted token.
 *
 * Implementations: `OrtDraftModel` in the app (ONNX Runtime Android), and a replay model in the tests.
 */
interface DraftModel : AutoCloseable {
    val vocabSize: Int

    /** Make the cache hold [context] with next-token logits ready. */
    fun sync(context: IntArray)

    /** Feed one drafted token after the cached context. */
    fun advance(token: Int)

    /** Logits over the vocabulary for the token after the cached context (valid after [sync] or [advance]). */
    fun nextLogits(): FloatArray

    override fun close() {}
}

/** One drafted token and what the controller and verifier need to know about it. */
class DraftToken(
    val token: Int,
    /** Probability the draft gave this token under the distribution it was drawn from. */
    val prob: Double,
    /** Entropy (nats) of the draft's untempered softmax at this position. */
    val entropy: Double,
    /** Largest probability of the untempered softmax. */
    val top1: Double,
    /** Sampling only: the sparse distribution the token was drawn from. */
    val q: Sampling.SparseQ? = null,
    /** Time spent to produce this position's logits. */
    val ms: Double = 0.0,
)

/** Turns logits into a draft token: argmax when greedy, otherwise a sample from the sparse q. */
object Proposer {
    fun propose(logits: FloatArray, sampling: SamplingParams, rng: java.util.Random?, ms: Double = 0.0): DraftToken {
        val plain = Sampling.softmax(logits)
        val top1Idx = Sampling.argmax(logits)
        val top1 = plain[top1Idx]
        val ent = Sampling.entropy(plain)
        if (sampling.greedy) return DraftToken(top1Idx, top1, ent, top1, null, ms)
        requireNotNull(rng) { "sampling needs an rng" }
        val q = Sampling.sparseQ(logits, sampling.temperature, sampling.topK, sampling.topP)
        val token = Sampling.sampleSparse(q, rng)
        return DraftToken(token, q.probOf(token).toDouble(), ent, top1, q, ms)
    }
}
