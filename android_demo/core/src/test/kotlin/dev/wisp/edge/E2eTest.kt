package dev.wisp.edge

import org.json.JSONObject
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Assumptions.assumeTrue
import org.junit.jupiter.api.BeforeEach
import org.junit.jupiter.api.Tag
import org.junit.jupiter.api.Test
import java.io.File

/**
 * End to end against a real `wisp serve` (tiny model) over OkHttp. android_demo/ci.sh starts the server, records
 * the Python SDK's greedy run and the draft's logits (tools/record_e2e.py), then runs this class with
 * WISP_E2E_URL and WISP_E2E_RECORDING set. Without them it is skipped.
 *
 * The JVM client's greedy output must be token-identical to the Python SDK's for the same prompt.
 */
@Tag("e2e")
class E2eTest {
    private lateinit var url: String
    private lateinit var rec: JSONObject
    private lateinit var pythonTokens: List<Int>

    @BeforeEach
    fun setUp() {
        val u = System.getenv("WISP_E2E_URL")
        val r = System.getenv("WISP_E2E_RECORDING")
        assumeTrue(u != null && r != null, "WISP_E2E_URL / WISP_E2E_RECORDING not set (run android_demo/ci.sh)")
        url = u!!
        rec = JSONObject(File(r!!).readText())
        pythonTokens = rec.getJSONArray("python_tokens").ints()
    }

    private fun run(ctl: Controller, onTokens: ((EdgeClient, GenerationStats) -> Unit)? = null): GenerationResult {
        val draft = ReplayDraftModel(rec)
        val cfg = ClientConfig(rec.getString("tokenizer_fingerprint"), frameTimeoutMs = 30_000, backoffInitialMs = 20)
        EdgeClient(OkHttpTransport(url), draft, cfg, ctl).use { client ->
            val opts = GenerateOptions(
                maxNewTokens = rec.getInt("max_new_tokens"),
                stopTokenIds = rec.getJSONArray("stop_token_ids").ints(),
            )
            val res = client.generate(rec.getJSONArray("prompt_ids").ints(), opts) { _, stats -> onTokens?.invoke(client, stats) }
            assertTrue(draft.lookups > 0 || ctl.maxDraft == 0)
            return res
        }
    }

    @Test
    fun fixedKIsTokenIdenticalToThePythonSdkRoundByRound() {
        val k = rec.getInt("fixed_k")
        val res = run(FixedK(k))
        assertEquals(pythonTokens, res.tokens)
        // Same controller, same draft numbers, same verifier: the same rounds.
        val pyRounds = rec.getJSONArray("python_rounds").objects()
        assertEquals(pyRounds.map { it.getInt("drafted") }, res.rounds.map { it.drafted }, "drafted per round")
        assertEquals(pyRounds.map { it.getInt("accepted") }, res.rounds.map { it.accepted }, "accepted per round")
        println("e2e fixed:$k  ${res.stats}")
    }

    @Test
    fun wispControllerIsTokenIdenticalToThePythonSdk() {
        val res = run(Wisp(RejectionPredictor.fromJson(rec.optJSONObject("predictor")), maxDraft = rec.getInt("max_draft")))
        assertEquals(pythonTokens, res.tokens)
        println("e2e wisp     ${res.stats}")
    }

    @Test
    fun droppedConnectionIsResumedWithoutLosingOrDuplicatingTokens() {
        var dropped = false
        val res = run(FixedK(2)) { client, stats ->
            if (!dropped && stats.tokens >= pythonTokens.size / 3) {
                dropped = true
                client.dropConnection()
            }
        }
        assertTrue(dropped)
        assertEquals(pythonTokens, res.tokens)
        assertTrue(res.stats.reconnects >= 1, "reconnected: ${res.stats}")
        println("e2e drop     ${res.stats}")
    }

    @Test
    fun connectionCutWhileARoundIsInFlightIsResumed() {
        // Cut the socket right after round 3 is handed to OkHttp: whether or not the server saw it, the client
        // must resume and re-send it, and the server must not apply it twice.
        var rounds = 0
        val cutting = Transport { timeoutMs ->
            val inner = OkHttpTransport(url).connect(timeoutMs)
            object : Connection by inner {
                override fun send(bytes: ByteArray) {
                    inner.send(bytes)
                    if (++rounds == 3) OkHttpTransport.cancel(inner)
                }
            }
        }
        val draft = ReplayDraftModel(rec)
        val cfg = ClientConfig(rec.getString("tokenizer_fingerprint"), frameTimeoutMs = 30_000, backoffInitialMs = 20)
        EdgeClient(cutting, draft, cfg, FixedK(3)).use { client ->
            val opts = GenerateOptions(
                maxNewTokens = rec.getInt("max_new_tokens"),
                stopTokenIds = rec.getJSONArray("stop_token_ids").ints(),
            )
            val res = client.generate(rec.getJSONArray("prompt_ids").ints(), opts)
            assertEquals(pythonTokens, res.tokens)
            assertTrue(res.stats.reconnects >= 1, "reconnected: ${res.stats}")
            println("e2e cut      ${res.stats}")
        }
    }

    @Test
    fun bpeTokenizerMatchesTheBundlesTokenizer() {
        val tok = BpeTokenizer.load(File(rec.getString("tokenizer_json")))
        assertEquals(rec.getString("chat_text"), ChatMl.format(listOf("user" to rec.getString("prompt"))))
        for (s in rec.getJSONArray("tokenizer_samples").objects()) {
            assertEquals(s.getJSONArray("ids").ints(), tok.encode(s.getString("text")), "encode ${s.getString("text")}")
        }
        assertEquals(rec.getJSONArray("prompt_ids").ints(), tok.encode(rec.getString("chat_text")))
        assertEquals(rec.getString("python_text_decoded"), tok.decode(pythonTokens))
    }
}
