package dev.wisp.edge

import kotlin.math.exp
import kotlin.math.ln

/**
 * The draft's sampling distribution q: temperature -> top-k -> top-p, then cut to at most [MAX_Q_SUPPORT] entries
 * and renormalized in float32, as `sdk/wisp_sdk/sampling.py` does. Speculative sampling is exact for any q as long
 * as the edge samples from exactly the float32 numbers it sends.
 */
object Sampling {
    const val MAX_Q_SUPPORT = 64

    /** A sparse distribution: token ids in descending probability and their float32 probabilities. */
    class SparseQ(val ids: IntArray, val probs: FloatArray) {
        fun probOf(token: Int): Float {
            val i = ids.indexOf(token)
            return if (i >= 0) probs[i] else 0f
        }
    }

    /** Numerically stable softmax in double precision. */
    fun softmax(logits: FloatArray): DoubleArray {
        var m = Double.NEGATIVE_INFINITY
        for (x in logits) if (x > m) m = x.toDouble()
        val out = DoubleArray(logits.size)
        var z = 0.0
        for (i in logits.indices) {
            val e = exp(logits[i] - m)
            out[i] = e
            z += e
        }
        for (i in out.indices) out[i] /= z
        return out
    }

    /** Entropy in nats. */
    fun entropy(probs: DoubleArray): Double {
        var h = 0.0
        for (p in probs) if (p > 0) h -= p * ln(p)
        return h
    }

    fun argmax(xs: FloatArray): Int {
        var best = 0
        for (i in 1 until xs.size) if (xs[i] > xs[best]) best = i
        return best
    }

    fun sparseQ(
        logits: FloatArray,
        temperature: Double,
        topK: Int = 0,
        topP: Double = 1.0,
        maxSupport: Int = MAX_Q_SUPPORT,
    ): SparseQ {
        require(temperature > 0) { "sparseQ needs temperature > 0 (temperature 0 is greedy: take the argmax)" }
        val vocab = logits.size
        val scaled = DoubleArray(vocab) { logits[it] / temperature }
        var n = minOf(maxSupport, vocab)
        if (topK > 0) n = minOf(n, topK)
        // The n largest in descending order; ties keep the lower index first (a stable sort).
        val top = (0 until vocab).sortedWith(compareByDescending<Int> { scaled[it] }.thenBy { it }).take(n)
        val m = scaled.max()
        val full = DoubleArray(vocab) { exp(scaled[it] - m) }
        var z = 0.0
        if (topK in 1 until vocab) {
            val kth = scaled.sortedArray()[vocab - topK]
            for (i in 0 until vocab) if (scaled[i] >= kth) z += full[i]
        } else {
            for (v in full) z += v
        }
        var ids = top.toIntArray()
        var probs = DoubleArray(ids.size) { full[ids[it]] / z }
        if (topP < 1.0) {
            var mass = 0.0
            var keep = 0
            for (i in ids.indices) {
                if (i == 0 || mass < topP) keep = i + 1 else break
                mass += probs[i]
            }
            ids = ids.copyOf(keep)
            probs = probs.copyOf(keep)
        }
        val q = FloatArray(ids.size) { probs[it].toFloat() }
        var s = 0f
        for (v in q) s += v
        for (i in q.indices) q[i] = q[i] / s
        return SparseQ(ids, q)
    }

    /** Sample from exactly the float32 numbers in q (their double cumulative sum, scaled to its total). */
    fun sampleSparse(q: SparseQ, rng: java.util.Random): Int {
        val cum = DoubleArray(q.probs.size)
        var acc = 0.0
        for (i in q.probs.indices) {
            acc += q.probs[i]
            cum[i] = acc
        }
        val u = rng.nextDouble() * acc
        var idx = 0
        while (idx < cum.size && cum[idx] <= u) idx++
        return q.ids[minOf(idx, q.ids.size - 1)]
    }
}
