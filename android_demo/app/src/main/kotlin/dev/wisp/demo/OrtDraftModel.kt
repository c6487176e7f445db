package dev.wisp.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OnnxValue
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import dev.wisp.edge.DraftModel
import org.json.JSONObject
import java.io.File
import java.nio.FloatBuffer
import java.nio.LongBuffer

/**
 * The draft bundle's ONNX model (from `wisp export`) on ONNX Runtime Android, with a KV cache that lives across
 * rounds: the same contract as the Python SDK's `DraftRunner`.
 *
 * The graph is optimum-onnx's `text-generation-with-past`: inputs `input_ids`, `attention_mask`, optional
 * `position_ids` and `past_key_values.{i}.key/value` shaped [1, kv_heads, past_len, head_dim]; outputs `logits`
 * and `present.{i}.key/value`. [sync] keeps the longest cached prefix that matches the new context and slices the
 * KV down to it (no re-prefill after a rejection), then feeds only the new tokens.
 *
 * Float32 KV only (`--quant none` or weight-only int4 bundles); not compiled in CI (no onnxruntime-android AAR
 * there): the same logic runs in Python as `DraftRunner` and is tested there.
 */
class OrtDraftModel(bundleDir: File, threads: Int = 4, useNnapi: Boolean = false) : DraftModel {
    val manifest: JSONObject = JSONObject(File(bundleDir, "wisp-draft.json").readText())
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val session: OrtSession
    private val numLayers = manifest.getInt("num_layers")
    private val kvHeads = manifest.getInt("num_kv_heads")
    private val headDim = manifest.getInt("head_dim")
    override val vocabSize: Int = manifest.getInt("vocab_size")
    private val pastNames: List<String>
    private val presentNames: List<String>
    private val hasPositionIds: Boolean

    private var past: List<OnnxTensor> = emptyList()
    private var lastResult: OrtSession.Result? = null
    private val tokens = ArrayList<Int>()
    private var logits: FloatArray? = null

    init {
        val opts = OrtSession.SessionOptions().apply {
            setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
            setIntraOpNumThreads(threads)
            setInterOpNumThreads(1)
            if (useNnapi) addNnapi()
        }
        val onnx = File(bundleDir, manifest.optString("onnx_file", "model.onnx"))
        session = env.createSession(onnx.absolutePath, opts)
        val layerOf = { n: String -> n.split('.')[1].toInt() }
        pastNames = session.inputNames.filter { it.startsWith("past_key_values.") }
            .sortedWith(compareBy<String>({ layerOf(it) }, { !it.endsWith(".key") }))
        presentNames = pastNames.map { it.replace("past_key_values", "present") }
        require(pastNames.size == 2 * numLayers) {
            "$onnx does not look like a KV-cached decoder (${pastNames.size} past inputs for $numLayers layers)"
        }
        hasPositionIds = "position_ids" in session.inputNames
        reset()
    }

    fun reset() {
        releasePast()
        past = List(pastNames.size) { OnnxTensor.createTensor(env, FloatBuffer.allocate(0), longArrayOf(1, kvHeads.toLong(), 0, headDim.toLong())) }
        tokens.clear()
        logits = null
    }

    override fun sync(context: IntArray) {
        require(context.isNotEmpty()) { "context must not be empty" }
        if (logits != null && tokens.size == context.size && tokens.indices.all { tokens[it] == context[it] }) return
        var common = 0
        val limit = minOf(tokens.size, context.size)
        while (common < limit && tokens[common] == context[common]) common++
        // Keep at least one token to feed: we need the logits after the last one.
        rollback(minOf(common, context.size - 1))
        feed(context.copyOfRange(tokens.size, context.size))
    }

    override fun advance(token: Int) = feed(intArrayOf(token))

    override fun nextLogits(): FloatArray = logits ?: throw IllegalStateException("no logits: call sync() first")

    /** Keep only the first [length] cached tokens: slice the KV along the sequence axis, no recomputation. */
    private fun rollback(length: Int) {
        if (length >= tokens.size) return
        val old = tokens.size
        val sliced = past.map { t ->
            val src = t.floatBuffer // a copy, [1, heads, old, dim]
            val dst = FloatBuffer.allocate(kvHeads * length * headDim)
            for (h in 0 until kvHeads) {
                val from = h * old * headDim
                for (i in 0 until length * headDim) dst.put(src.get(from + i))
            }
            dst.rewind()
            OnnxTensor.createTensor(env, dst, longArrayOf(1, kvHeads.toLong(), length.toLong(), headDim.toLong()))
        }
        releasePast()
        past = sliced
        while (tokens.size > length) tokens.removeAt(tokens.size - 1)
        logits = null
    }

    private fun feed(newTokens: IntArray) {
        if (newTokens.isEmpty()) return
        val n = newTokens.size
        val pastLen = tokens.size
        val owned = ArrayList<OnnxTensor>()
        val inputs = HashMap<String, OnnxTensor>()
        fun longs(name: String, values: LongArray) {
            val t = OnnxTensor.createTensor(env, LongBuffer.wrap(values), longArrayOf(1, values.size.toLong()))
            owned.add(t)
            inputs[name] = t
        }
        longs("input_ids", LongArray(n) { newTokens[it].toLong() })
        longs("attention_mask", LongArray(pastLen + n) { 1L })
        if (hasPositionIds) longs("position_ids", LongArray(n) { (pastLen + it).toLong() })
        pastNames.forEachIndexed { i, name -> inputs[name] = past[i] }

        val result = session.run(inputs)
        owned.forEach { it.close() }
        val outputs = HashMap<String, OnnxValue>()
        for (entry in result) outputs[entry.key] = entry.value
        val out = outputs["logits"] as OnnxTensor
        val all = out.floatBuffer // [1, n, vocab] (or [1, 1, vocab] for graphs that keep only the last row)
        val row = FloatArray(vocabSize)
        all.position((all.remaining() / vocabSize - 1) * vocabSize)
        all.get(row)
        // The presents become the next past; they belong to `result`, which stays open until replaced.
        val newPast = presentNames.map { outputs[it] as OnnxTensor }
        releasePast()
        past = newPast
        lastResult = result
        tokens.addAll(newTokens.toList())
        logits = row
    }

    private fun releasePast() {
        val r = lastResult
        if (r != null) {
            r.close() // closes the presents we were using as past
            lastResult = null
        } else {
            past.forEach { it.close() }
        }
        past = emptyList()
    }

    override fun close() {
        releasePast()
        session.close()
    }
}
