package dev.wisp.edge

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class EdgeClientTest {
    private val prompt = listOf(11, 12, 13, 14, 15)
    private val target = FakeTarget()
    private val expected = target.greedy(prompt, 40)

    private fun client(server: FakeServer, ctl: Controller = FixedK(4), cfg: ClientConfig? = null) =
        EdgeClient(server, FakeDraft(target), cfg ?: ClientConfig("sha256:fake", backoffInitialMs = 1, frameTimeoutMs = 2_000), ctl)

    @Test
    fun greedyOutputIsTheTargetsForEveryController() {
        for (ctl in listOf(FixedK(0), FixedK(1), FixedK(4), FixedK(8), Wisp(), Wisp(maxDraft = 3))) {
            val server = FakeServer(target)
            val res = client(server, ctl).generate(prompt, GenerateOptions(maxNewTokens = 40))
            assertEquals(expected, res.tokens, "controller ${ctl.name}")
            assertEquals(40, res.stats.tokens)
            // Rounds are numbered 1, 2, ... and each starts from the committed length the server has.
            assertEquals((1..server.roundsSeen.size).toList(), server.roundsSeen.map { it.round })
            assertTrue(server.roundsSeen.all { it.draftIds.size <= 8 })
            assertTrue(server.sessions.isEmpty(), "session closed")
        }
    }

    @Test
    fun switchesToServerDecodingAndBackKeepTheOutput() {
        for (ctl in listOf(FixedK(4), Wisp())) {
            val server = FakeServer(target).apply { hybridEvery = 2 }
            val seen = ArrayList<Int>()
            val res = client(server, ctl).generate(prompt, GenerateOptions(maxNewTokens = 40)) { toks, _ -> seen.addAll(toks) }
            assertEquals(expected, res.tokens, "controller ${ctl.name}")
            assertEquals(expected, seen, "every token streamed once")
            assertTrue(res.stats.switches >= 4, "out and back at least twice: ${res.stats.switches}")
            // Rounds continue their numbering after each stretch of server-side decoding.
            assertEquals((1..server.roundsSeen.size).toList(), server.roundsSeen.map { it.round })
        }
    }

    @Test
    fun sessionsStartOnTheServerWhenItTakesTheOffer() {
        for (ctl in listOf(FixedK(4), Wisp())) {
            val server = FakeServer(target).apply { startOnServerTokens = 6 }
            val seen = ArrayList<Int>()
            val opts = GenerateOptions(maxNewTokens = 40, startOnServer = true)
            val res = client(server, ctl).generate(prompt, opts) { toks, _ -> seen.addAll(toks) }
            assertTrue(server.opens.single().startOnServer)
            assertEquals(expected, res.tokens, "controller ${ctl.name}")
            assertEquals(expected, seen, "every token streamed once")
            assertEquals(1, res.stats.switches, "handed to the edge once")
            // Opened's token and the server's 6 came before any round; rounds then number from 1.
            val first = server.roundsSeen.first()
            assertEquals(1, first.round)
            assertEquals(prompt.size + 1 + 6, first.committedLen)
            assertEquals((1..server.roundsSeen.size).toList(), server.roundsSeen.map { it.round })
        }
    }

    @Test
    fun theStartOnServerOfferIsOffByDefaultAndMayBeDeclined() {
        val server = FakeServer(target).apply { startOnServerTokens = 6 }
        val res = client(server).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertEquals(expected, res.tokens)
        assertTrue(!server.opens.single().startOnServer, "not offered unless asked for")
        assertEquals(prompt.size + 1, server.roundsSeen.first().committedLen, "drafts right after Opened")
        assertEquals(0, res.stats.switches)
        // Offered, but the server declines (no --regime): Opened.mode is speculative and the edge drafts at once.
        val declining = FakeServer(target)
        val res2 = client(declining).generate(prompt, GenerateOptions(maxNewTokens = 40, startOnServer = true))
        assertEquals(expected, res2.tokens)
        assertTrue(declining.opens.single().startOnServer)
        assertEquals(prompt.size + 1, declining.roundsSeen.first().committedLen)
    }

    @Test
    fun theOfferFollowsWhetherTheServerDecodedTheLastGeneration() {
        // moved, handed back, ended on the edge -> offer next time (the truth table of wisp_sdk's rule)
        assertTrue(serverDecodesNext(previous = false, movedToServer = true, handedToEdge = false, endedOnEdge = false))
        assertTrue(!serverDecodesNext(previous = true, movedToServer = true, handedToEdge = true, endedOnEdge = true))
        assertTrue(!serverDecodesNext(previous = true, movedToServer = false, handedToEdge = false, endedOnEdge = true))
        assertTrue(serverDecodesNext(previous = true, movedToServer = false, handedToEdge = false, endedOnEdge = false))
        assertTrue(!serverDecodesNext(previous = false, movedToServer = false, handedToEdge = false, endedOnEdge = false))

        val server = FakeServer(target).apply { decodeAll = true }
        val c = client(server)
        val opts = GenerateOptions(maxNewTokens = 40)
        // 1: no offer; its first verdict moves it to the server, which decodes it to the end
        assertEquals(expected, c.generate(prompt, opts).tokens)
        assertTrue(!server.opens[0].startOnServer && server.roundsSeen.size == 1 && c.serverDecodes)
        // 2: offered and taken: decoded from its first token, no round
        assertEquals(expected, c.generate(prompt, opts).tokens)
        assertTrue(server.opens[1].startOnServer && server.roundsSeen.size == 1 && c.serverDecodes)
        // an explicit false is never overridden
        assertEquals(expected, c.generate(prompt, opts.copy(startOnServer = false)).tokens)
        assertTrue(!server.opens[2].startOnServer)
        // 3: the server speculates again: offered, taken, handed to the edge after 6 tokens -> no offer after it
        server.decodeAll = false
        server.startOnServerTokens = 6
        val res = c.generate(prompt, opts)
        assertEquals(expected, res.tokens)
        assertTrue(server.opens[3].startOnServer && res.stats.switches == 1 && !c.serverDecodes)
        assertEquals(expected, c.generate(prompt, opts).tokens)
        assertTrue(!server.opens[4].startOnServer)
    }

    @Test
    fun aSessionThatStartsOnTheServerMayEndThere() {
        val server = FakeServer(target).apply { startOnServerTokens = 50 }
        val res = client(server).generate(prompt, GenerateOptions(maxNewTokens = 40, startOnServer = true))
        assertEquals(expected, res.tokens)
        assertTrue(server.roundsSeen.isEmpty(), "no round: the server decoded it all")
        assertEquals(40, res.stats.tokens)
    }

    @Test
    fun truncatedVerifyCommitsThePrefixAndIsNoRejection() {
        val server = FakeServer(target).apply { verifyCap = 1 }
        val ctl = Wisp()
        val res = client(server, ctl).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertEquals(expected, res.tokens)
        assertTrue(res.rounds.all { it.accepted <= 1 })
    }

    @Test
    fun aVerdictsDraftCapBoundsTheNextRound() {
        val server = FakeServer(target).apply { draftCap = 2 }
        val res = client(server, FixedK(6)).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertEquals(expected, res.tokens)
        assertEquals(6, server.roundsSeen.first().draftIds.size) // before any verdict: the controller's own k
        assertTrue(server.roundsSeen.drop(1).all { it.draftIds.size <= 2 }, "${server.roundsSeen.map { it.draftIds.size }}")
    }

    @Test
    fun fixedKDraftsKAndAcceptanceIsCounted() {
        val server = FakeServer(target)
        val res = client(server, FixedK(4)).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertTrue(server.roundsSeen.dropLast(1).all { it.draftIds.size == 4 })
        assertEquals(res.rounds.sumOf { it.accepted }, res.stats.accepted)
        assertEquals(res.rounds.sumOf { it.drafted }, res.stats.drafted)
        assertTrue(res.stats.accepted in 1 until res.stats.drafted, "some accepted, some rejected: ${res.stats}")
        // Every committed token comes from the opened message or a verdict: 1 + sum(accepted + 1).
        assertEquals(40, 1 + res.rounds.sumOf { it.accepted + 1 })
        assertTrue(res.stats.tokensPerSecond > 0)
    }

    @Test
    fun listenerStreamsEveryTokenOnce() {
        val seen = ArrayList<Int>()
        val res = client(FakeServer(target), Wisp()).generate(prompt, GenerateOptions(maxNewTokens = 25)) { toks, _ -> seen.addAll(toks) }
        assertEquals(res.tokens, seen)
        assertEquals(expected.take(25), seen)
    }

    @Test
    fun resumesWhenTheRoundIsLostBeforeTheServerSawIt() {
        val server = FakeServer(target).apply { dropAtRound = 3; dropApplyFirst = false }
        val res = client(server).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertEquals(expected, res.tokens)
        assertEquals(1, res.stats.reconnects)
        assertEquals(2, server.connects)
        assertEquals(1, server.opens.size, "resumed, not reopened")
    }

    @Test
    fun aSwitchLearnedFromResumedCountsForTheNextOffer() {
        // round 1's verdict (centralize) is lost with the link; Resumed says the server decodes the session
        val server = FakeServer(target).apply { decodeAll = true; dropAtRound = 1; dropApplyFirst = true }
        val c = client(server)
        val opts = GenerateOptions(maxNewTokens = 40)
        val res = c.generate(prompt, opts)
        assertEquals(expected, res.tokens)
        assertTrue(res.stats.reconnects == 1 && res.stats.switches == 1 && c.serverDecodes, "${res.stats}")
        assertEquals(expected, c.generate(prompt, opts).tokens)
        assertTrue(server.opens[1].startOnServer) // offered: the server decoded the last generation
    }

    @Test
    fun resumesWhenTheVerdictIsLost() {
        val server = FakeServer(target).apply { dropAtRound = 2; dropApplyFirst = true }
        val res = client(server).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertEquals(expected, res.tokens)
        assertEquals(1, res.stats.reconnects)
        // Round 2 was sent twice (the server answered the second from its cache) and never applied twice.
        assertEquals(2, server.roundsSeen.count { it.round == 2 })
    }

    @Test
    fun rebuildsASessionTheServerLost() {
        val server = FakeServer(target).apply { forgetAtRound = 4 }
        val res = client(server).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertEquals(expected, res.tokens)
        assertEquals(2, server.opens.size)
        val reopen = server.opens[1]
        assertEquals(prompt, reopen.promptIds)
        assertEquals(expected.take(reopen.committedIds.size), reopen.committedIds)
        assertEquals(1, res.stats.rebuilds)
    }

    @Test
    fun rebuildsAfterAReconnectWhenTheServerRestarted() {
        val server = FakeServer(target).apply { dropAtRound = 3; forgetAtRound = 3 }
        val res = client(server).generate(prompt, GenerateOptions(maxNewTokens = 40))
        assertEquals(expected, res.tokens)
        assertEquals(2, server.opens.size)
    }

    @Test
    fun retriesRefusedConnectionsWithBackoff() {
        val server = FakeServer(target).apply { refuseConnects = 3 }
        val res = client(server).generate(prompt, GenerateOptions(maxNewTokens = 10))
        assertEquals(expected.take(10), res.tokens)
        assertEquals(4, server.connects)
        assertEquals(3, res.stats.reconnects)
    }

    @Test
    fun givesUpAfterTheDeadline() {
        val server = FakeServer(target).apply { refuseConnects = Int.MAX_VALUE }
        val cfg = ClientConfig("sha256:fake", reconnectDeadlineMs = 100, backoffInitialMs = 5, backoffMaxMs = 20)
        val e = expectThrows<WispException> { client(server, cfg = cfg).generate(prompt) }
        assertTrue(e.message!!.contains("could not resume"), e.message)
    }

    @Test
    fun tokenizerMismatchIsAClearError() {
        val server = FakeServer(target, fingerprint = "sha256:other")
        val e = expectThrows<WispServerException> { client(server).generate(prompt) }
        assertEquals(ErrorCode.TOKENIZER_MISMATCH, e.code)
    }

    @Test
    fun wispDraftsLessOnAFastLinkThanOnASlowOne() {
        fun drafted(rtt: Double, hint: Double): Int {
            val ctl = Wisp()
            val link = LinkState(rttMs = rtt, waitHintMs = hint, verifyMs = 2.0, draftMs = 5.0, maxDraft = 16)
            ctl.startRound(link)
            val kept = ArrayList<DraftToken>()
            while (true) {
                val tok = DraftToken(1, 0.9, 0.3, 0.9)
                val a = ctl.step(kept + tok)
                if (a == Action.DROP) break
                kept.add(tok)
                if (a == Action.SEND) break
            }
            return kept.size
        }
        val fast = drafted(1.0, 0.0)
        val slow = drafted(100.0, 0.0)
        val waiting = drafted(20.0, 500.0)
        assertTrue(fast < slow, "fast $fast slow $slow")
        assertTrue(slow <= waiting, "slow $slow waiting $waiting")
        assertEquals(16, waiting)
    }

    @Test
    fun wispStopsBeforeAPredictedRejection() {
        val ctl = Wisp()
        ctl.startRound(LinkState(rttMs = 500.0, maxDraft = 16))
        val sure = DraftToken(1, 0.95, 0.2, 0.95)
        val flat = DraftToken(2, 0.1, 3.0, 0.1)
        assertEquals(Action.CONTINUE, ctl.step(listOf(sure)))
        assertEquals(Action.DROP, ctl.step(listOf(sure, flat)))
    }

    @Test
    fun samplingRoundsCarryTheDistributionTheyWereSampledFrom() {
        val server = FakeServer(target)
        val opts = GenerateOptions(maxNewTokens = 12, sampling = SamplingParams(temperature = 0.8, topP = 0.95, seed = 7))
        val res = client(server, FixedK(3)).generate(prompt, opts)
        assertEquals(12, res.tokens.size)
        for (r in server.roundsSeen) {
            val q = r.qIds!!
            assertEquals(r.draftIds.size, q.size)
            for (i in r.draftIds.indices) {
                assertTrue(r.draftIds[i] in q[i].toList())
                assertEquals(1.0, r.qProbs!![i].sum().toDouble(), 1e-5)
            }
        }
    }

    @Test
    fun protocolRejectsBadSessionIds() {
        expectThrows<ProtocolException> { Round("xyz", 1, 1, listOf(1)).encode() }
        expectThrows<ProtocolException> { Round("zz".repeat(16), 1, 1, listOf(1)).encode() }
    }
}
