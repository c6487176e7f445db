package dev.wisp.edge

import okhttp3.OkHttpClient
import okhttp3.Request
import okhttp3.Response
import okhttp3.WebSocket
import okhttp3.WebSocketListener
import okio.ByteString
import java.io.IOException
import java.util.concurrent.CountDownLatch
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit

/** A frame received on a connection. */
sealed class Frame {
    class Text(val text: String) : Frame()
    class Binary(val bytes: ByteArray) : Frame()

    /** The connection is gone (closed by the peer or failed); nothing more will arrive. */
    class Gone(val reason: String, val error: Throwable? = null) : Frame()
}

/** The link dropped: the client reconnects and resumes the session. */
class ConnectionLost(message: String, cause: Throwable? = null) : IOException(message, cause)

/** One websocket connection. Implementations must be safe to [close] from any thread. */
interface Connection : AutoCloseable {
    /** Send a text frame; throws [ConnectionLost] if the connection is gone. */
    fun send(text: String)

    /** Send a binary frame; throws [ConnectionLost] if the connection is gone. */
    fun send(bytes: ByteArray)

    /** The next frame, or null after [timeoutMs] with nothing received. */
    fun receive(timeoutMs: Long): Frame?

    override fun close()
}

/** Opens connections to one server. */
fun interface Transport {
    /** Connect (throws an IOException if the server cannot be reached within [timeoutMs]). */
    fun connect(timeoutMs: Long): Connection
}

/**
 * The OkHttp websocket transport. OkHttp 3.12+ and 4.x have the same `WebSocket` API; this file compiles against
 * either (CI uses Debian's OkHttp 3.13, the app OkHttp 4).
 *
 * The auth token goes in an `Authorization: Bearer` header; `Hello.auth_token` is for clients that cannot set one.
 */
class OkHttpTransport(
    private val url: String,
    private val authToken: String? = null,
    private val client: OkHttpClient = OkHttpClient.Builder().pingInterval(15, TimeUnit.SECONDS).build(),
) : Transport {
    override fun connect(timeoutMs: Long): Connection {
        val builder = Request.Builder().url(url).header("Sec-WebSocket-Protocol", Protocol.SUBPROTOCOL)
        if (authToken != null) builder.header("Authorization", "Bearer $authToken")
        val conn = OkHttpConnection()
        val ws = client.newWebSocket(builder.build(), conn.listener)
        conn.ws = ws
        if (!conn.opened.await(timeoutMs, TimeUnit.MILLISECONDS)) {
            ws.cancel()
            throw ConnectionLost("could not connect to $url within $timeoutMs ms")
        }
        conn.failure?.let { throw ConnectionLost("could not connect to $url: ${it.message}", it) }
        return conn
    }

    private class OkHttpConnection : Connection {
        @Volatile var ws: WebSocket? = null
        @Volatile var failure: Throwable? = null
        @Volatile var gone = false
        val opened = CountDownLatch(1)
        val queue = LinkedBlockingQueue<Frame>()

        val listener = object : WebSocketListener() {
            override fun onOpen(webSocket: WebSocket, response: Response) {
                opened.countDown()
            }

            override fun onMessage(webSocket: WebSocket, text: String) {
                queue.put(Frame.Text(text))
            }

            override fun onMessage(webSocket: WebSocket, bytes: ByteString) {
                queue.put(Frame.Binary(bytes.toByteArray()))
            }

            override fun onClosing(webSocket: WebSocket, code: Int, reason: String) {
                gone = true
                webSocket.close(1000, null)
                queue.put(Frame.Gone("closed by server ($code $reason)"))
            }

            override fun onClosed(webSocket: WebSocket, code: Int, reason: String) {
                gone = true
                queue.put(Frame.Gone("closed ($code $reason)"))
            }

            override fun onFailure(webSocket: WebSocket, t: Throwable, response: Response?) {
                gone = true
                failure = t
                queue.put(Frame.Gone("connection failed: ${t.message}", t))
                opened.countDown()
            }
        }

        override fun send(text: String) {
            val w = ws
            if (gone || w == null || !w.send(text)) throw ConnectionLost("connection is closed")
        }

        override fun send(bytes: ByteArray) {
            val w = ws
            if (gone || w == null || !w.send(ByteString.of(*bytes))) throw ConnectionLost("connection is closed")
        }

        override fun receive(timeoutMs: Long): Frame? = queue.poll(timeoutMs, TimeUnit.MILLISECONDS)

        override fun close() {
            gone = true
            ws?.close(1000, null)
        }

        /** Drop the link abruptly (no close handshake), as a dead network would. */
        fun cancel() {
            gone = true
            ws?.cancel()
        }
    }

    companion object {
        /** Abruptly drop [conn] if it is an OkHttp connection (for fault tests and the demo's "drop link" button). */
        fun cancel(conn: Connection) {
            if (conn is OkHttpConnection) conn.cancel() else conn.close()
        }
    }
}
