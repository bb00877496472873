import random

import pytest

from steer.runtime.detokenize import IncrementalDetokenizer, TokenDecoder

TEXT = "Héllo wörld, ça va? 日本語 🙂 The smith’s “best” blade.  Two  spaces\nand a new line."


def _stream(decoder, ids):
    detok = IncrementalDetokenizer(decoder)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.finish())
    return detok, deltas


def test_streamed_text_equals_the_full_decode_and_never_changes(any_tokenizer):
    decoder = TokenDecoder.for_tokenizer(any_tokenizer)
    rng = random.Random(0)
    byte_ids = sorted(decoder.byte_tokens)
    sequences = [any_tokenizer(TEXT, add_special_tokens=False)["input_ids"]]
    for _ in range(300):  # random ids, some runs of byte tokens: what a sampling model can emit
        sequences.append([rng.choice(byte_ids) if byte_ids and rng.random() < 0.3 else rng.randrange(len(any_tokenizer))
                          for _ in range(rng.randrange(1, 80))])
    for ids in sequences:
        full = decoder.decode(ids)
        detok = IncrementalDetokenizer(decoder)
        streamed = ""
        for token in ids:
            streamed += detok.add(token)
            assert full.startswith(detok.text), (ids, detok.text)  # settled text is never taken back
        streamed += detok.finish()
        assert streamed == detok.text == full, ids


def test_a_split_character_waits_for_its_last_byte(llama_tokenizer):
    decoder = TokenDecoder.for_tokenizer(llama_tokenizer)
    ids = llama_tokenizer("a 日 b", add_special_tokens=False)["input_ids"]
    assert sum(t in decoder.byte_tokens for t in ids) == 3, "日 takes three byte-fallback tokens here"
    detok, deltas = _stream(decoder, ids)
    assert "\ufffd" not in "".join(deltas)
    assert "日 b" in deltas  # the character arrives whole, with the token that ends its byte run
    assert detok.text == "a 日 b"


def test_stray_bytes_settle_like_a_full_decode(llama_tokenizer):
    decoder = TokenDecoder.for_tokenizer(llama_tokenizer)
    caret, stray = llama_tokenizer.convert_tokens_to_ids(["<0x5E>", "<0xFD>"])
    # "^" alone decodes as "^", but with a stray byte after it the run decodes as two U+FFFD: a
    # byte token settles nothing until the run ends.
    assert decoder.decode([caret]) == "^" and decoder.decode([caret, stray]) == "\ufffd\ufffd"
    detok = IncrementalDetokenizer(decoder)
    assert detok.add(caret) == "" and detok.add(stray) == ""
    assert detok.finish() == "\ufffd\ufffd" == detok.text


def test_each_token_decodes_a_short_window(gpt2_tokenizer):
    decoder = TokenDecoder.for_tokenizer(gpt2_tokenizer)
    windows = []
    counting = TokenDecoder(lambda ids: windows.append(len(ids)) or decoder.decode(ids), decoder.byte_tokens)
    ids = gpt2_tokenizer(TEXT * 8, add_special_tokens=False)["input_ids"]
    detok, _ = _stream(counting, ids)
    assert detok.text == TEXT * 8 and len(ids) > 300
    # Constant work per token, not the whole reply again: the longest window is a split emoji
    # (three tokens) plus its context.
    assert max(windows) <= 5
    assert len(windows) <= 2 * len(ids) + 2


@pytest.mark.parametrize("cleanup", [False, True])
def test_decoder_keeps_special_tokens_with_or_without_space_cleanup(gpt2_tokenizer, cleanup):
    tok = type(gpt2_tokenizer).from_pretrained(gpt2_tokenizer.name_or_path)
    tok.clean_up_tokenization_spaces = cleanup
    ids = tok("Hi there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert TokenDecoder.for_tokenizer(tok).decode(ids) == tok.decode(ids, skip_special_tokens=False)


def test_fast_tokenizers_stream_through_decode_stream_with_the_same_text(any_tokenizer):
    """DecodeStream (tokenizers) for fast tokenizers, byte-fallback runs included: the same text as a
    full decode, settled text never taken back, a split character only once it is whole."""
    from steer.runtime.detokenize import StreamDetokenizer

    decoder = TokenDecoder.for_tokenizer(any_tokenizer)
    assert isinstance(decoder.detokenizer(), StreamDetokenizer)
    rng = random.Random(1)
    byte_ids = sorted(decoder.byte_tokens)
    sequences = [any_tokenizer(TEXT, add_special_tokens=False)["input_ids"]]
    for _ in range(300):
        sequences.append([rng.choice(byte_ids) if byte_ids and rng.random() < 0.3 else rng.randrange(len(any_tokenizer))
                          for _ in range(rng.randrange(1, 80))])
    for ids in sequences:
        full = decoder.decode(ids)
        detok = decoder.detokenizer()
        streamed = ""
        for token in ids:
            delta = detok.add(token)
            streamed += delta
            assert full.startswith(detok.text), (ids, detok.text)
        streamed += detok.finish()
        assert streamed == detok.text == full, ids


def test_space_cleanup_keeps_the_window_detokenizer(gpt2_tokenizer):
    tok = type(gpt2_tokenizer).from_pretrained(gpt2_tokenizer.name_or_path)
    tok.clean_up_tokenization_spaces = True
    assert isinstance(TokenDecoder.for_tokenizer(tok).detokenizer(), IncrementalDetokenizer)
