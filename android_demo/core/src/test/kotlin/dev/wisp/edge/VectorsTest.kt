package dev.wisp.edge

import org.json.JSONArray
import org.json.JSONObject
import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.DynamicTest
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestFactory
import kotlin.math.abs

/** Replays `vectors.json`, written from `wisp_sdk` by `android_demo/tools/make_vectors.py`. */
class VectorsTest {
    private val v: JSONObject = loadVectors()

    @Test
    fun header() {
        assertEquals(Protocol.VERSION, v.getInt("protocol_version"))
        assertEquals(Protocol.SUBPROTOCOL, v.getString("subprotocol"))
    }

    @TestFactory
    fun jsonFrames(): List<DynamicTest> = v.getJSONArray("json").objects().map { vec ->
        DynamicTest.dynamicTest("json ${vec.getString("direction")} ${vec.getString("name")}") {
            val text = vec.getString("text")
            val fields = vec.getJSONObject("fields")
            val encoded: JSONObject = if (vec.getString("direction") == "client") {
                val msg = Codec.decodeClient(text)
                assertJsonEquals(fields, msg.toJson(), "decode->encode")
                // Decoding our own encoding gives the same message back.
                assertEquals(msg, Codec.decodeClient(msg.encode()))
                msg.toJson()
            } else {
                val msg = Codec.decodeServer(text)
                val again = Codec.encodeServer(msg) as String
                assertEquals(msg, Codec.decodeServer(again))
                JSONObject(again)
            }
            assertJsonEquals(JSONObject(text), encoded, "kotlin encoding vs python text")
        }
    }

    @Test
    fun startOnServerAndOpenedMode() {
        val byName = v.getJSONArray("json").objects().associateBy { it.getString("name") }
        val offer = Codec.decodeClient(byName.getValue("open_start_on_server").getString("text")) as Open
        assertTrue(offer.startOnServer)
        assertEquals("speculative", offer.mode)
        assertEquals(false, (Codec.decodeClient(byName.getValue("open_default").getString("text")) as Open).startOnServer)
        assertEquals("centralized", (Codec.decodeServer(byName.getValue("opened_central").getString("text")) as Opened).mode)
        assertEquals("speculative", (Codec.decodeServer(byName.getValue("opened").getString("text")) as Opened).mode)
        // Frames of an older server or client (no such fields) decode with the defaults.
        val old = Codec.decodeServer("""{"type":"opened","session_id":"0123456789abcdef0123456789abcdef","committed_len":4,"next_token":17}""") as Opened
        assertEquals("speculative", old.mode)
        assertEquals(false, (Codec.decodeClient("""{"type":"open","prompt_ids":[1]}""") as Open).startOnServer)
        assertEquals(true, Open(listOf(1), startOnServer = true).toJson().getBoolean("start_on_server"))
    }

    @TestFactory
    fun roundFrames(): List<DynamicTest> = v.getJSONArray("round").objects().map { vec ->
        DynamicTest.dynamicTest("round ${vec.getString("name")}") {
            val bytes = hex(vec.getString("hex"))
            val f = vec.getJSONObject("fields")
            val r = Round.decode(bytes)
            assertEquals(f.getString("session_id"), r.sessionId)
            assertEquals(f.getInt("round"), r.round)
            assertEquals(f.getInt("committed_len"), r.committedLen)
            assertEquals(f.getJSONArray("draft_ids").ints(), r.draftIds)
            val built = Round(
                sessionId = f.getString("session_id"),
                round = f.getInt("round"),
                committedLen = f.getInt("committed_len"),
                draftIds = f.getJSONArray("draft_ids").ints(),
                qIds = f.optJSONArray("q_ids")?.arrays()?.map { it.ints().toIntArray() },
                qProbs = f.optJSONArray("q_probs")?.arrays()?.map { a -> FloatArray(a.length()) { a.getDouble(it).toFloat() } },
            )
            assertEquals(built, r)
            assertArrayEquals(bytes, built.encode(), "kotlin encoding differs from python's")
        }
    }

    @Test
    fun aVerdictNamingASiblingIsRefused() {
        // token trees (protocol 5): this client sends no siblings, so a verdict that commits one is a broken server
        val bytes = hex(v.getJSONArray("verdict").objects().first().getString("hex"))
        bytes[2] = (bytes[2].toInt() or Protocol.FLAG_SIBLING).toByte()
        val e = expectThrows<ProtocolException> { Verdict.decode(bytes) }
        assertTrue(e.message!!.contains("sibling"), e.message)
    }

    @TestFactory
    fun verdictFrames(): List<DynamicTest> = v.getJSONArray("verdict").objects().map { vec ->
        DynamicTest.dynamicTest("verdict ${vec.getString("name")}") {
            val bytes = hex(vec.getString("hex"))
            val f = vec.getJSONObject("fields")
            val d = Verdict.decode(bytes)
            val expected = Verdict(
                sessionId = f.getString("session_id"),
                round = f.getInt("round"),
                committedLen = f.getInt("committed_len"),
                accepted = f.getInt("accepted"),
                nextToken = f.getInt("next_token"),
                done = f.getBoolean("done"),
                queueMs = f.getDouble("queue_ms").toFloat(),
                verifyMs = f.getDouble("verify_ms").toFloat(),
                waitHintMs = f.getDouble("wait_hint_ms").toFloat(),
                priceMs = f.getDouble("price_ms").toFloat(),
                unverified = f.getInt("unverified"),
                centralize = f.getBoolean("centralize"),
                launchInMs = f.getDouble("launch_in_ms").toFloat(),
                draftCap = f.getInt("draft_cap"),
            )
            assertEquals(expected, d)
            assertEquals(f.getDouble("wait_hint_ms"), d.waitHintMs.toDouble(), 0.0) // float32 values, exactly
            assertArrayEquals(bytes, expected.encode())
            assertEquals(expected, Codec.decodeServer(bytes))
        }
    }

    @TestFactory
    fun invalidFrames(): List<DynamicTest> = v.getJSONArray("invalid").objects().map { vec ->
        DynamicTest.dynamicTest("invalid ${vec.getString("kind")} ${vec.getString("name")}") {
            val e = when (vec.getString("kind")) {
                "round" -> expectThrows<ProtocolException> { Round.decode(hex(vec.getString("hex"))) }
                "verdict" -> expectThrows<ProtocolException> { Verdict.decode(hex(vec.getString("hex"))) }
                else -> expectThrows<ProtocolException> { Codec.decodeServer(vec.getString("text")) }
            }
            if (vec.getString("kind") != "server_text") {
                assertEquals(vec.getString("error"), e.message, "same message as the python SDK")
            }
        }
    }

    @Test
    fun predictor() {
        val p = v.getJSONObject("predictor")
        val def = p.getJSONObject("default")
        val fromManifest = RejectionPredictor.fromJson(def)
        val pred = RejectionPredictor()
        assertArrayEquals(fromManifest.weights, pred.weights)
        assertEquals(fromManifest.bias, pred.bias)
        for (c in p.getJSONArray("cases").objects()) {
            val got = pred.pAccept(c.getDouble("top1"), c.getDouble("entropy"), c.getInt("position"), c.getDouble("rate"))
            assertClose(c.getDouble("p"), got, REL_TOL, "p_accept($c)")
        }
        val cal = RejectionPredictor.fromJson(p.getJSONObject("calibrated"))
        for (c in p.getJSONArray("calibrated_cases").objects()) {
            val got = cal.pAccept(c.getDouble("top1"), c.getDouble("entropy"), c.getInt("position"), c.getDouble("rate"))
            assertClose(c.getDouble("p"), got, REL_TOL, "calibrated p_accept($c)")
        }
    }

    @TestFactory
    fun controllerDecisions(): List<DynamicTest> = v.getJSONArray("controller").objects().map { sess ->
        DynamicTest.dynamicTest("controller ${sess.getString("name")}") {
            val ctl = Controller.make(sess.getString("controller"))
            val l = sess.getJSONObject("link")
            for ((ri, r) in sess.getJSONArray("rounds").objects().withIndex()) {
                ctl.startRound(
                    LinkState(l.getDouble("rtt_ms"), l.getDouble("wait_hint_ms"), l.getDouble("verify_ms"),
                        l.getDouble("draft_ms"), l.getInt("max_draft"), l.optDouble("price_ms", 0.0),
                        l.optDouble("launch_in_ms", 0.0)),
                )
                val kept = ArrayList<DraftToken>()
                val actions = ArrayList<String>()
                for (prop in r.getJSONArray("proposals").objects()) {
                    val top1 = prop.getDouble("top1")
                    val tok = DraftToken(kept.size, top1, prop.getDouble("entropy"), top1)
                    val a = ctl.step(kept + tok)
                    actions.add(a.name.lowercase())
                    if (a == Action.DROP) break
                    kept.add(tok)
                    if (a == Action.SEND) break
                }
                assertEquals(r.getJSONArray("actions").strings(), actions, "round $ri actions")
                ctl.observe(kept, r.getInt("accepted"))
                if (!r.isNull("rate_after")) {
                    assertClose(r.getDouble("rate_after"), (ctl as Wisp).rate, REL_TOL, "round $ri rate")
                }
            }
        }
    }

    @TestFactory
    fun sparseQ(): List<DynamicTest> = v.getJSONArray("sparse_q").objects().withIndex().map { (i, c) ->
        DynamicTest.dynamicTest("sparse_q #$i") {
            val la = c.getJSONArray("logits")
            val logits = FloatArray(la.length()) { la.getDouble(it).toFloat() }
            val q = Sampling.sparseQ(logits, c.getDouble("temperature"), c.getInt("top_k"), c.getDouble("top_p"))
            assertEquals(c.getJSONArray("ids").ints(), q.ids.toList())
            val probs = c.getJSONArray("probs")
            // numpy's float32 exp and pairwise sums are ported; a few float32 ulps allow for libm differences.
            assertEquals(probs.length(), q.probs.size)
            for (j in 0 until probs.length()) assertClose(probs.getDouble(j), q.probs[j].toDouble(), F32_REL_TOL, "q[$j]")
            val tok = Proposer.propose(logits, SamplingParams(), null)
            assertEquals(c.getInt("argmax"), tok.token)
            assertEquals(c.getDouble("top1"), tok.top1, 1e-9)
            assertEquals(c.getDouble("entropy"), tok.entropy, 1e-9)
        }
    }

    companion object {
        /** Relative tolerance for float64 results (numpy/libm may move the last bit between releases). */
        const val REL_TOL = 1e-12

        /** Relative tolerance for float32 results: about eight float32 ulps. */
        const val F32_REL_TOL = 1e-6

        fun assertClose(expected: Double, actual: Double, rel: Double, where: String) {
            val tol = rel * maxOf(1.0, abs(expected), abs(actual))
            assertTrue(abs(expected - actual) <= tol, "$where: expected $expected, got $actual (beyond $rel relative)")
        }

        fun loadVectors(): JSONObject {
            val stream = VectorsTest::class.java.getResourceAsStream("/vectors.json")
                ?: error("vectors.json is not on the test classpath")
            return JSONObject(stream.bufferedReader().readText())
        }

        fun hex(s: String): ByteArray = ByteArray(s.length / 2) { s.substring(2 * it, 2 * it + 2).toInt(16).toByte() }

        /** JSON equality with numbers compared by value (Python writes 2000.0 where org.json writes 2000). */
        fun assertJsonEquals(expected: Any?, actual: Any?, where: String) {
            assertTrue(jsonEquals(expected, actual), "$where: expected $expected, got $actual")
        }

        private fun jsonEquals(a: Any?, b: Any?): Boolean = when {
            a is JSONObject && b is JSONObject -> {
                val ka = a.keys().asSequence().toSet()
                val kb = b.keys().asSequence().toSet()
                ka == kb && ka.all { jsonEquals(a.get(it), b.get(it)) }
            }
            a is JSONArray && b is JSONArray -> a.length() == b.length() && (0 until a.length()).all { jsonEquals(a.get(it), b.get(it)) }
            a is Number && b is Number -> abs(a.toDouble() - b.toDouble()) <= 1e-12 * maxOf(1.0, abs(a.toDouble()))
            else -> a == b
        }
    }
}

fun JSONArray.objects(): List<JSONObject> = List(length()) { getJSONObject(it) }
fun JSONArray.arrays(): List<JSONArray> = List(length()) { getJSONArray(it) }
fun JSONArray.ints(): List<Int> = List(length()) { getInt(it) }
fun JSONArray.strings(): List<String> = List(length()) { getString(it) }
