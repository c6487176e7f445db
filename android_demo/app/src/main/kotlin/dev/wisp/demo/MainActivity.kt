package dev.wisp.demo

import android.app.Activity
import android.os.Bundle
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.RadioGroup
import android.widget.ScrollView
import android.widget.TextView
import dev.wisp.edge.BpeTokenizer
import dev.wisp.edge.ChatMl
import dev.wisp.edge.ClientConfig
import dev.wisp.edge.EdgeClient
import dev.wisp.edge.FixedK
import dev.wisp.edge.GenerateOptions
import dev.wisp.edge.GenerationStats
import dev.wisp.edge.OkHttpTransport
import dev.wisp.edge.RejectionPredictor
import dev.wisp.edge.Wisp
import java.io.File
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * The WISP edge demo: the draft model runs on the phone (ONNX Runtime), a `wisp serve` verifier in the cloud
 * checks each round over the same websocket protocol as the Python SDK.
 *
 * Push a draft bundle made by `wisp export` to the app's files folder first:
 *
 *     adb push BUNDLE /sdcard/Android/data/dev.wisp.demo/files/draft-bundle
 *
 * The prompt box's text is sent as one user message through ChatML (the template of Qwen2 bundles); the text
 * streams in as tokens commit, with live acceptance and tokens/s below the buttons.
 */
class MainActivity : Activity() {
    private lateinit var serverUrl: EditText
    private lateinit var authToken: EditText
    private lateinit var prompt: EditText
    private lateinit var controller: RadioGroup
    private lateinit var generate: Button
    private lateinit var dropLink: Button
    private lateinit var stats: TextView
    private lateinit var output: TextView
    private lateinit var scroll: ScrollView

    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private var draft: OrtDraftModel? = null
    private var tokenizer: BpeTokenizer? = null
    @Volatile private var client: EdgeClient? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        serverUrl = findViewById(R.id.server_url)
        authToken = findViewById(R.id.auth_token)
        prompt = findViewById(R.id.prompt)
        controller = findViewById(R.id.controller)
        generate = findViewById(R.id.generate)
        dropLink = findViewById(R.id.drop_link)
        stats = findViewById(R.id.stats)
        output = findViewById(R.id.output)
        scroll = findViewById(R.id.output_scroll)

        generate.setOnClickListener { startGeneration() }
        // Demonstrates resume: the client reconnects, resumes the session and loses no token.
        dropLink.setOnClickListener { client?.dropConnection() }
    }

    override fun onDestroy() {
        worker.shutdownNow()
        client?.close()
        draft?.close()
        super.onDestroy()
    }

    private fun bundleDir(): File = File(getExternalFilesDir(null), "draft-bundle")

    private fun startGeneration() {
        val url = serverUrl.text.toString().trim()
        val token = authToken.text.toString().trim().ifEmpty { null }
        val text = prompt.text.toString()
        val useWisp = controller.checkedRadioButtonId == R.id.controller_wisp
        generate.isEnabled = false
        dropLink.isEnabled = true
        output.text = ""
        stats.setText(R.string.stats_idle)

        worker.execute {
            try {
                val dir = bundleDir()
                if (!File(dir, "wisp-draft.json").isFile) {
                    ui { output.text = getString(R.string.bundle_missing, dir.absolutePath) }
                    return@execute
                }
                val model = draft ?: OrtDraftModel(dir).also { draft = it }
                val tok = tokenizer ?: BpeTokenizer.load(File(dir, "tokenizer.json")).also { tokenizer = it }
                val manifest = model.manifest
                val eos = manifest.getJSONArray("eos_token_ids").let { a -> List(a.length()) { a.getInt(it) } }
                val predictor = RejectionPredictor.fromJson(manifest.optJSONObject("predictor"))
                val ctl = if (useWisp) Wisp(predictor) else FixedK(4)
                val cfg = ClientConfig(manifest.getString("tokenizer_fingerprint"), authToken = token)
                val promptIds = tok.encode(ChatMl.format(listOf("user" to text)))
                val stream = BpeTokenizer.TextStream(tok)
                EdgeClient(OkHttpTransport(url, token), model, cfg, ctl).use { c ->
                    client = c
                    val opts = GenerateOptions(maxNewTokens = 256, stopTokenIds = eos)
                    val res = c.generate(promptIds, opts) { newTokens, st ->
                        val delta = stream.push(newTokens)
                        val snapshot = statsLine(st)
                        ui {
                            output.append(delta)
                            stats.text = snapshot
                            scroll.post { scroll.fullScroll(View.FOCUS_DOWN) }
                        }
                    }
                    ui { stats.text = statsLine(res.stats) }
                }
            } catch (e: Exception) {
                ui { output.append("\n" + getString(R.string.error_format, e.message ?: e.toString())) }
            } finally {
                client = null
                ui {
                    generate.isEnabled = true
                    dropLink.isEnabled = false
                }
            }
        }
    }

    private fun statsLine(s: GenerationStats): String = getString(
        R.string.stats_format,
        s.tokens, s.tokensPerSecond, 100.0 * s.acceptance, s.meanAcceptedPerRound, s.ttftMs, s.wastedMs, s.reconnects,
    )

    private fun ui(block: () -> Unit) = runOnUiThread(block)
}
