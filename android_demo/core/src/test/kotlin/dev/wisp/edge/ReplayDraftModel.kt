package dev.wisp.edge

import org.json.JSONObject
import java.io.File

/**
 * A [DraftModel] that replays logits recorded by `android_demo/tools/record_e2e.py` from the draft bundle's ONNX
 * file (through the Python SDK's `DraftRunner`): for every committed context of the Python SDK's run and each
 * greedy draft continuation of it, the logits the ONNX draft gives. Greedy drafting from any committed context
 * then stays inside the table, so the JVM client drafts exactly what the ONNX model would.
 *
 * A context outside the table fails loudly (that would mean the JVM client committed something the Python SDK
 * did not).
 */
class ReplayDraftModel(recording: JSONObject) : DraftModel {
    override val vocabSize: Int = recording.getInt("vocab_size")
    private val table = HashMap<String, FloatArray>()
    private val cached = ArrayList<Int>()
    var lookups = 0
        private set

    init {
        val contexts = recording.getJSONArray("contexts")
        for (i in 0 until contexts.length()) {
            val e = contexts.getJSONObject(i)
            val ctx = e.getJSONArray("context")
            val key = (0 until ctx.length()).joinToString(",") { ctx.getInt(it).toString() }
            val l = e.getJSONArray("logits")
            table[key] = FloatArray(l.length()) { l.getDouble(it).toFloat() }
        }
    }

    override fun sync(context: IntArray) {
        cached.clear()
        cached.addAll(context.toList())
    }

    override fun advance(token: Int) {
        cached.add(token)
    }

    override fun nextLogits(): FloatArray {
        lookups++
        return table[cached.joinToString(",")]
            ?: throw AssertionError("no recorded draft logits for a context of ${cached.size} tokens ending ${cached.takeLast(8)}")
    }

    companion object {
        fun load(file: File) = ReplayDraftModel(JSONObject(file.readText()))
    }
}
