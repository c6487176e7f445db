package dev.wisp.edge

import org.json.JSONArray
import org.json.JSONObject
import java.io.ByteArrayOutputStream
import java.text.Normalizer
import java.util.regex.Pattern

/**
 * A byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (the one in the draft bundle), for devices
 * without the `tokenizers` library: GPT-2/Qwen2-style models (ByteLevel pre-tokenizer or a Split regex followed by
 * ByteLevel, optional NFC normalizer, BPE merges, added tokens matched first).
 *
 * The end-to-end test checks it against the Python SDK on the test bundle: same prompt ids, same decoded text.
 * Tokenizers of other kinds (SentencePiece/Metaspace) are refused with a clear error.
 */
class BpeTokenizer(json: JSONObject) {
    private val vocab = HashMap<String, Int>()
    private val idToToken: Array<String?>
    private val ranks = HashMap<String, Int>()
    private val added = ArrayList<Pair<String, Int>>() // longest first
    private val addedIds = HashMap<Int, String>()
    val specialIds: Set<Int>
    private val splitPattern: Pattern
    private val nfc: Boolean
    private val ignoreMerges: Boolean
    private val cache = HashMap<String, IntArray>()

    init {
        val model = json.getJSONObject("model")
        require(model.optString("type", "BPE") == "BPE") { "only BPE tokenizers are supported, not ${model.optString("type")}" }
        val v = model.getJSONObject("vocab")
        for (k in v.keys()) vocab[k] = v.getInt(k)
        val merges = model.optJSONArray("merges") ?: JSONArray()
        for (i in 0 until merges.length()) {
            val m = merges.get(i)
            val key = if (m is JSONArray) m.getString(0) + " " + m.getString(1) else m as String
            ranks.putIfAbsent(key, i)
        }
        ignoreMerges = model.optBoolean("ignore_merges", false)
        val specials = HashSet<Int>()
        json.optJSONArray("added_tokens")?.let { a ->
            for (i in 0 until a.length()) {
                val t = a.getJSONObject(i)
                added.add(t.getString("content") to t.getInt("id"))
                addedIds[t.getInt("id")] = t.getString("content")
                vocab.putIfAbsent(t.getString("content"), t.getInt("id"))
                if (t.optBoolean("special", false)) specials.add(t.getInt("id"))
            }
        }
        added.sortByDescending { it.first.length }
        specialIds = specials
        val maxId = maxOf(vocab.values.maxOrNull() ?: 0, addedIds.keys.maxOrNull() ?: 0)
        idToToken = arrayOfNulls(maxId + 1)
        for ((k, id) in vocab) idToToken[id] = k

        val norm = json.opt("normalizer")
        nfc = norm is JSONObject && (norm.optString("type") == "NFC" ||
            (norm.optString("type") == "Sequence" && norm.getJSONArray("normalizers").toString().contains("\"NFC\"")))
        if (norm is JSONObject && !nfc) throw IllegalArgumentException("unsupported normalizer ${norm.optString("type")}")
        splitPattern = Pattern.compile(preTokenizerRegex(json.opt("pre_tokenizer")), Pattern.UNICODE_CHARACTER_CLASS)
    }

    private fun preTokenizerRegex(pre: Any?): String {
        require(pre is JSONObject) { "tokenizer has no pre_tokenizer: not a byte-level BPE" }
        return when (pre.getString("type")) {
            "ByteLevel" -> GPT2_PATTERN
            "Sequence" -> {
                val items = pre.getJSONArray("pretokenizers")
                var pattern: String? = null
                for (i in 0 until items.length()) {
                    val p = items.getJSONObject(i)
                    when (p.getString("type")) {
                        "Split" -> pattern = p.getJSONObject("pattern").getString("Regex")
                        "ByteLevel" -> if (p.optBoolean("use_regex", true) && pattern == null) pattern = GPT2_PATTERN
                        else -> throw IllegalArgumentException("unsupported pre-tokenizer ${p.getString("type")}")
                    }
                }
                pattern ?: GPT2_PATTERN
            }
            else -> throw IllegalArgumentException("unsupported pre-tokenizer ${pre.getString("type")}")
        }
    }

    val size: Int get() = idToToken.size

    fun tokenToId(token: String): Int? = vocab[token]

    fun encode(text: String): List<Int> {
        val out = ArrayList<Int>()
        var start = 0
        var i = 0
        while (i < text.length) {
            val hit = added.firstOrNull { text.startsWith(it.first, i) }
            if (hit != null) {
                if (start < i) encodePlain(text.substring(start, i), out)
                out.add(hit.second)
                i += hit.first.length
                start = i
            } else {
                i++
            }
        }
        if (start < text.length) encodePlain(text.substring(start), out)
        return out
    }

    private fun encodePlain(raw: String, out: MutableList<Int>) {
        val text = if (nfc) Normalizer.normalize(raw, Normalizer.Form.NFC) else raw
        val m = splitPattern.matcher(text)
        var last = 0
        while (m.find()) {
            if (m.start() > last) encodeWord(text.substring(last, m.start()), out)
            if (m.end() > m.start()) encodeWord(m.group(), out)
            last = m.end()
        }
        if (last < text.length) encodeWord(text.substring(last), out)
    }

    private fun encodeWord(word: String, out: MutableList<Int>) {
        val ids = cache.getOrPut(word) { bpe(word) }
        for (id in ids) out.add(id)
    }

    private fun bpe(word: String): IntArray {
        val bytes = word.toByteArray(Charsets.UTF_8)
        val mapped = StringBuilder(bytes.size).apply { for (b in bytes) append(BYTE_TO_CHAR[b.toInt() and 0xFF]) }.toString()
        if (ignoreMerges) vocab[mapped]?.let { return intArrayOf(it) }
        val parts = ArrayList<String>(mapped.length)
        for (c in mapped) parts.add(c.toString())
        while (parts.size > 1) {
            var best = -1
            var bestRank = Int.MAX_VALUE
            for (j in 0 until parts.size - 1) {
                val r = ranks[parts[j] + " " + parts[j + 1]] ?: continue
                if (r < bestRank) {
                    bestRank = r
                    best = j
                }
            }
            if (best < 0) break
            val a = parts[best]
            val b = parts[best + 1]
            var j = 0
            val merged = ArrayList<String>(parts.size)
            while (j < parts.size) {
                if (j < parts.size - 1 && parts[j] == a && parts[j + 1] == b) {
                    merged.add(a + b)
                    j += 2
                } else {
                    merged.add(parts[j])
                    j++
                }
            }
            parts.clear()
            parts.addAll(merged)
        }
        return IntArray(parts.size) { vocab[parts[it]] ?: throw IllegalArgumentException("no token for '${parts[it]}'") }
    }

    /** Decode ids to text; special tokens are skipped unless [skipSpecial] is false. */
    fun decode(ids: List<Int>, skipSpecial: Boolean = true): String {
        val sb = StringBuilder()
        val bytes = ByteArrayOutputStream()
        fun flush() {
            if (bytes.size() > 0) {
                sb.append(String(bytes.toByteArray(), Charsets.UTF_8))
                bytes.reset()
            }
        }
        for (id in ids) {
            val addedText = addedIds[id]
            if (addedText != null) {
                if (skipSpecial && id in specialIds) continue
                flush()
                sb.append(addedText)
                continue
            }
            val tok = idToToken.getOrNull(id) ?: continue
            for (c in tok) {
                val b = CHAR_TO_BYTE[c]
                if (b != null) bytes.write(b) else bytes.write(c.toString().toByteArray(Charsets.UTF_8))
            }
        }
        flush()
        return sb.toString()
    }

    /** Turns committed ids into text deltas, holding back a partial UTF-8 character until it completes. */
    class TextStream(private val tok: BpeTokenizer) {
        private val ids = ArrayList<Int>()
        private var emitted = 0
        val text: String get() = tok.decode(ids)

        fun push(newIds: List<Int>): String {
            ids.addAll(newIds)
            var full = tok.decode(ids)
            if (full.endsWith('\uFFFD')) full = full.trimEnd('\uFFFD')
            if (full.length <= emitted) return ""
            val delta = full.substring(emitted)
            emitted = full.length
            return delta
        }
    }

    companion object {
        const val GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

        private val BYTE_TO_CHAR = CharArray(256)
        private val CHAR_TO_BYTE = HashMap<Char, Int>()

        init {
            // GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
            var n = 0
            for (b in 0 until 256) {
                val printable = b in 33..126 || b in 161..172 || b in 174..255
                val c = if (printable) b.toChar() else (256 + n++).toChar()
                BYTE_TO_CHAR[b] = c
                CHAR_TO_BYTE[c] = b
            }
        }

        fun load(file: java.io.File) = BpeTokenizer(JSONObject(file.readText()))
    }
}

/** ChatML, the template of Qwen2 models and the test bundles: `<|im_start|>role\ncontent<|im_end|>\n`... */
object ChatMl {
    fun format(messages: List<Pair<String, String>>, addGenerationPrompt: Boolean = true): String {
        val sb = StringBuilder()
        for ((role, content) in messages) sb.append("<|im_start|>").append(role).append('\n').append(content).append("<|im_end|>\n")
        if (addGenerationPrompt) sb.append("<|im_start|>assistant\n")
        return sb.toString()
    }
}
