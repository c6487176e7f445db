package dev.wisp.edge

import org.json.JSONObject
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Test

class TokenizerTest {
    // A hand-made byte-level BPE: bytes, a few merges, two special tokens. "Ġ" is the byte-level space.
    private val json = JSONObject(
        """
        {"added_tokens":[{"id":0,"content":"<|im_start|>","special":true},{"id":1,"content":"<|im_end|>","special":true}],
         "normalizer":null,
         "pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"use_regex":true},
         "model":{"type":"BPE","vocab":{"<|im_start|>":0,"<|im_end|>":1,"h":2,"e":3,"l":4,"o":5,"Ġ":6,"w":7,"r":8,"d":9,
                  "he":10,"ll":11,"hell":12,"hello":13,"Ġw":14,"or":15,"Ġwor":16,"Ġworld":17,"Ã":18,"©":19,"é":20,"Ċ":21},
                  "merges":[["h","e"],["l","l"],["he","ll"],["hell","o"],["Ġ","w"],["o","r"],["Ġw","or"],["Ġwor","ld"],"Ã ©"]}}
        """.trimIndent(),
    )
    private val tok = BpeTokenizer(json)

    @Test
    fun encodesWithMergesAndSpecialTokens() {
        assertEquals(listOf(13), tok.encode("hello"))
        assertEquals(listOf(0, 13, 16, 4, 9, 1), tok.encode("<|im_start|>hello world<|im_end|>"))
        assertEquals(listOf(13, 21), tok.encode("hello\n"))
    }

    @Test
    fun decodesBytesAndSkipsSpecials() {
        assertEquals("hello world", tok.decode(listOf(0, 13, 16, 4, 9, 1)))
        assertEquals("<|im_start|>hello", tok.decode(listOf(0, 13), skipSpecial = false))
        // "é" is two UTF-8 bytes: C3 A9 -> byte-level chars "Ã" "©".
        assertEquals("é", tok.decode(listOf(18, 19)))
    }

    @Test
    fun textStreamHoldsBackHalfACharacter() {
        val s = BpeTokenizer.TextStream(tok)
        assertEquals("hello", s.push(listOf(13)))
        assertEquals("", s.push(listOf(18))) // first byte of é
        assertEquals("é", s.push(listOf(19)))
        assertEquals("helloé", s.text)
    }

    @Test
    fun chatMlFormat() {
        assertEquals("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", ChatMl.format(listOf("user" to "hi")))
    }
}
