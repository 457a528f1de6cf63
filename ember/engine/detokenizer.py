"""Incremental detokenization and stop-string matching, one `DetokenizerState` per sequence.

Text is produced from a sliding window of tokens (the prefix/read offset scheme): decode the tokens
since `prefix_offset` with and without the newest ones, and emit the difference. A window whose text
ends in U+FFFD is an incomplete UTF-8 character (a byte-fallback token split it), so nothing is emitted
until the next token completes it. Stop strings are matched on the text; the part of the text that could
still become a stop string is held back, so a stop string never leaks into the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_INITIAL_WINDOW = 5  # prompt tokens decoded for context, so leading-space rules apply correctly


@dataclass
class DetokenizerState:
    """Decoding progress of one sequence."""

    token_ids: list[int]  # prompt tail + output tokens, the window's source
    prefix_offset: int  # start of the context window inside token_ids
    read_offset: int  # tokens before this are already turned into text
    stop: list[str]  # stop strings of the request
    include_stop_str: bool  # keep the stop string in the output
    skip_special_tokens: bool
    text: str = ""  # all text produced so far (may include a held-back tail)
    stop_reason: str | None = None  # the stop string that matched
    emitted_len: int = field(default=0)  # chars of `text` safe to show

    @property
    def output_text(self) -> str:
        """Text safe to return now: nothing that could still turn out to be (part of) a stop string."""
        return self.text[: self.emitted_len]


class Detokenizer:
    """Turns newly sampled tokens into text for many sequences; shares one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def new_state(self, prompt_token_ids: list[int], stop: list[str], include_stop_str: bool = False,
                  skip_special_tokens: bool = True) -> DetokenizerState:
        tail = list(prompt_token_ids[-_INITIAL_WINDOW:])
        return DetokenizerState(token_ids=tail, prefix_offset=0, read_offset=len(tail), stop=list(stop),
                                include_stop_str=include_stop_str, skip_special_tokens=skip_special_tokens)

    def append(self, state: DetokenizerState, new_token_ids: list[int], is_finished: bool = False) -> bool:
        """Add tokens; returns True when a stop string matched (text is then truncated at it)."""
        for tok in new_token_ids:
            state.token_ids.append(tok)
            self._decode_step(state)
            if state.stop and self._check_stop(state):
                return True
        state.emitted_len = len(state.text) if is_finished else len(state.text) - _held_back(state.text, state.stop)
        return False

    def finish(self, state: DetokenizerState) -> None:
        """The sequence ended for another reason: release any held-back text."""
        state.emitted_len = len(state.text)

    def _decode_step(self, state: DetokenizerState) -> None:
        decode = self.tokenizer.decode
        skip = state.skip_special_tokens
        prefix_text = decode(state.token_ids[state.prefix_offset:state.read_offset], skip_special_tokens=skip)
        new_text = decode(state.token_ids[state.prefix_offset:], skip_special_tokens=skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            state.text += new_text[len(prefix_text):]
            state.prefix_offset = state.read_offset
            state.read_offset = len(state.token_ids)
        # keep the window short so each step decodes a handful of tokens
        if len(state.token_ids) > 64 and state.prefix_offset > 32:
            cut = state.prefix_offset
            del state.token_ids[:cut]
            state.prefix_offset -= cut
            state.read_offset -= cut

    def _check_stop(self, state: DetokenizerState) -> bool:
        # only the newest text can complete a stop string: search a tail of the text
        max_len = max(len(s) for s in state.stop)
        start = max(0, len(state.text) - max_len - 16)
        best = None
        for s in state.stop:
            pos = state.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return False
        pos, s = best
        state.text = state.text[: pos + len(s)] if state.include_stop_str else state.text[:pos]
        state.emitted_len = len(state.text)
        state.stop_reason = s
        return True


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
