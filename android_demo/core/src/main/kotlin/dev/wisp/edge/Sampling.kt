package dev.wisp.edge

import kotlin.math.exp
import kotlin.math.ln

/**
 * The draft's sampling distribution q: temperature -> top-k -> top-p, then cut to at most [MAX_Q_SUPPORT] entries
 * and renormalized in float32, as `sdk/wisp_sdk/sampling.py` does (a port that gives the same float32 numbers). Speculative sampling is exact for any q as long
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

    /**
     * The processed draft distribution at one position, cut to <= [maxSupport] entries and renormalized: the same
     * float32 numbers as `wisp_sdk.sampling.sparse_q`.
     *
     * Like the SDK, it ranks the float32 logits (temperature > 0 keeps the order), finds the top-k set and within it
     * the support without sorting the vocabulary, normalizes over the top-k set (or the whole vocabulary) with
     * float32 exponentials summed in float64, and computes the kept probabilities in float64. The float32 steps
     * reproduce numpy's: its vectorized float32 `exp` ([expF32]) and its pairwise summation ([pairwiseSum]). The
     * only order numpy leaves unspecified is that of the top-k set (argpartition's), which can move the float64
     * normalizer by an ulp; it is summed here in descending order. Logits tying at the cut may also be kept
     * differently; q only has to be what the edge samples from and sends, so neither matters for exactness.
     */
    fun sparseQ(
        logits: FloatArray,
        temperature: Double,
        topK: Int = 0,
        topP: Double = 1.0,
        maxSupport: Int = MAX_Q_SUPPORT,
    ): SparseQ {
        require(temperature > 0) { "sparseQ needs temperature > 0 (temperature 0 is greedy: take the argmax)" }
        val vocab = logits.size
        val k = if (topK in 1 until vocab) topK else vocab
        val n = minOf(maxSupport, k)
        // The top-k set (descending) for top-k's normalizer, and within it the support.
        val cut = if (k < vocab) topIndices(logits, k) else null
        var ids = cut?.copyOf(n) ?: topIndices(logits, n)
        // Normalizer of the tempered softmax over the kept set, in float64 from float32 exponentials.
        val mF = logits[ids[0]]
        val m = mF.toDouble()
        val tF = temperature.toFloat()
        val e: DoubleArray = if (cut != null) {
            DoubleArray(cut.size) { expF32((logits[cut[it]] - mF) / tF).toDouble() }
        } else {
            DoubleArray(vocab) { expF32((logits[it] - mF) / tF).toDouble() }
        }
        val z = sumBuffered(e)
        var probs = DoubleArray(ids.size) { exp((logits[ids[it]].toDouble() - m) / temperature) / z }
        if (topP < 1.0) {
            // A token is removed iff the mass strictly above it already reaches top_p (HF's TopPLogitsWarper).
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
        val s = pairwiseSum(q)
        for (i in q.indices) q[i] = q[i] / s
        return SparseQ(ids, q)
    }

    /** The [count] largest of [x], in descending order, ties lower index first, without sorting all of [x]. */
    internal fun topIndices(x: FloatArray, count: Int): IntArray {
        val n = minOf(count, x.size)
        if (n <= 0) return IntArray(0)
        if (n > 256) {
            // Large selections: one primitive sort of (descending value, index) keys.
            val keys = LongArray(x.size) { i ->
                val b = java.lang.Float.floatToIntBits(x[i])
                val ordered = if (b < 0) b xor Int.MAX_VALUE else b // monotonic in the float's value
                ((Int.MAX_VALUE.toLong() - ordered.toLong()) shl 31) or i.toLong()
            }
            java.util.Arrays.sort(keys)
            return IntArray(n) { (keys[it] and Int.MAX_VALUE.toLong()).toInt() }
        }
        // Small selections (the usual case): a sorted buffer of the best n; most tokens fail the first comparison.
        val idx = IntArray(n)
        val v = FloatArray(n)
        var size = 0
        for (i in x.indices) {
            val xi = x[i]
            if (size == n && xi <= v[n - 1]) continue // not better than the worst kept (ties keep the lower index)
            var j = if (size < n) size++ else n - 1
            while (j > 0 && v[j - 1] < xi) {
                v[j] = v[j - 1]
                idx[j] = idx[j - 1]
                j--
            }
            v[j] = xi
            idx[j] = i
        }
        return idx
    }

    /**
     * numpy's float32 `exp` on x86 (AVX2/AVX512F): Cody-Waite range reduction, a rational minimax approximation,
     * then scaling by 2^k, all in float32 with fused multiply-adds. Its results are within a few ulps of the true
     * value and differ from a correctly rounded exp in about a third of the cases, so matching the SDK's q
     * bit-for-bit needs this very algorithm.
     */
    fun expF32(x: Float): Float {
        if (x.isNaN()) return x
        if (x > 88.72283935546875f) return Float.POSITIVE_INFINITY
        if (x < -103.97208404541015625f) return 0f
        var quadrant = x * LOG2E_F
        quadrant = (quadrant + RINT_MAGIC_F) - RINT_MAGIC_F
        var y = Math.fma(quadrant, CODY_WAITE_HIGH_F, x)
        y = Math.fma(quadrant, CODY_WAITE_LOW_F, y)
        var num = Math.fma(EXP_P5, y, EXP_P4)
        num = Math.fma(num, y, EXP_P3)
        num = Math.fma(num, y, EXP_P2)
        num = Math.fma(num, y, EXP_P1)
        num = Math.fma(num, y, EXP_P0)
        var den = Math.fma(EXP_Q2, y, EXP_Q1)
        den = Math.fma(den, y, 1f)
        return Math.scalb(num / den, quadrant.toInt())
    }

    private const val LOG2E_F = 1.442695040888963407359924681001892137f
    private const val RINT_MAGIC_F = 12582912f // 0x1.8p23
    private const val CODY_WAITE_HIGH_F = -6.93145752e-1f
    private const val CODY_WAITE_LOW_F = -1.42860677e-6f
    private const val EXP_P0 = 9.999999999980870924916e-01f
    private const val EXP_P1 = 7.257664613233124478488e-01f
    private const val EXP_P2 = 2.473615434895520810817e-01f
    private const val EXP_P3 = 5.114512081637298353406e-02f
    private const val EXP_P4 = 6.757896990527504603057e-03f
    private const val EXP_P5 = 5.082762527590693718096e-04f
    private const val EXP_Q1 = -2.742335390411667452936e-01f
    private const val EXP_Q2 = 2.159509375685829852307e-02f

    /** numpy's pairwise float32 sum (`a.sum(dtype=np.float32)`): 8 interleaved partial sums per block of 128. */
    fun pairwiseSum(a: FloatArray, from: Int = 0, to: Int = a.size): Float {
        val n = to - from
        if (n < 8) {
            var res = 0f
            for (i in from until to) res += a[i]
            return res
        }
        if (n <= PAIRWISE_BLOCK) {
            val r = FloatArray(8) { a[from + it] }
            var i = 8
            while (i < n - n % 8) {
                for (j in 0 until 8) r[j] += a[from + i + j]
                i += 8
            }
            var res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
            while (i < n) res += a[from + i++]
            return res
        }
        var n2 = n / 2
        n2 -= n2 % 8
        return pairwiseSum(a, from, from + n2) + pairwiseSum(a, from + n2, to)
    }

    /** The same pairwise summation in float64. */
    fun pairwiseSum(a: DoubleArray, from: Int = 0, to: Int = a.size): Double {
        val n = to - from
        if (n < 8) {
            var res = 0.0
            for (i in from until to) res += a[i]
            return res
        }
        if (n <= PAIRWISE_BLOCK) {
            val r = DoubleArray(8) { a[from + it] }
            var i = 8
            while (i < n - n % 8) {
                for (j in 0 until 8) r[j] += a[from + i + j]
                i += 8
            }
            var res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
            while (i < n) res += a[from + i++]
            return res
        }
        var n2 = n / 2
        n2 -= n2 % 8
        return pairwiseSum(a, from, from + n2) + pairwiseSum(a, from + n2, to)
    }

    /** `float32_array.sum(dtype=np.float64)`: numpy casts through 8192-element buffers, each summed pairwise. */
    fun sumBuffered(a: DoubleArray): Double {
        var acc = 0.0
        var start = 0
        while (start < a.size) {
            val end = minOf(a.size, start + NUMPY_BUFSIZE)
            acc += pairwiseSum(a, start, end)
            start = end
        }
        return acc
    }

    private const val PAIRWISE_BLOCK = 128
    private const val NUMPY_BUFSIZE = 8192

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
