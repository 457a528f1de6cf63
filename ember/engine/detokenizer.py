"""Incremental detokenization and stop-string matching, one `DetokenizerState` per sequence.

Text is produced from a sliding window of tokens (the prefix/read offset scheme): decode the tokens
since `prefix_offset` with and without the newest ones, and emit the difference. A window whose text
ends in U+FFFD is an incomplete UTF-8 character (a byte-fallback token split it), so nothing is emitted
until the next token completes it. Stop strings are matched on the text; the part of the text that could
still become a stop string is held back, so a stop string never leaks into the output. Runs in the
front end (the API server process), never in the engine core: a matched stop string aborts the sequence
in the core.
"""

from __future__ import annotations

from dataclasses import dataclass

_INITIAL_WINDOW = 5  # prompt tokens decoded for context, so leading-space rules apply correctly


@dataclass
class DetokenizerState:
    """Decoding progress of one sequence. Everything here is bounded (a token window, the held-back
    tail): the text itself is handed out as deltas by `Detokenizer.take` and accumulated by the caller."""

    token_ids: list[int]  # prompt tail + newest output tokens, the window's source (at most ~64)
    prefix_offset: int  # start of the context window inside token_ids
    read_offset: int  # tokens before this are already turned into text
    stop: list[str]  # stop strings of the request
    include_stop_str: bool  # keep the stop string in the output
    skip_special_tokens: bool
    pending: str = ""  # decoded text not yet safe to emit: it could still become a stop string
    new_text: str = ""  # emitted since the last take()
    stop_reason: str | None = None  # the stop string that matched


class Detokenizer:
    """Turns newly sampled tokens into text deltas for many sequences; shares one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def new_state(self, prompt_token_ids: list[int], stop: list[str], include_stop_str: bool = False,
                  skip_special_tokens: bool = True) -> DetokenizerState:
        tail = list(prompt_token_ids[-_INITIAL_WINDOW:])
        return DetokenizerState(token_ids=tail, prefix_offset=0, read_offset=len(tail), stop=list(stop),
                                include_stop_str=include_stop_str, skip_special_tokens=skip_special_tokens)

    def append(self, state: DetokenizerState, new_token_ids: list[int]) -> bool:
        """Add tokens; returns True when a stop string matched (the text then ends at it)."""
        for tok in new_token_ids:
            state.token_ids.append(tok)
            state.pending += self._decode_step(state)
            if state.stop and self._check_stop(state):
                return True
        held = _held_back(state.pending, state.stop) if state.stop else 0
        cut = len(state.pending) - held
        if cut:
            state.new_text += state.pending[:cut]
            state.pending = state.pending[cut:]
        return False

    def finish(self, state: DetokenizerState) -> None:
        """The sequence ended for another reason: release any held-back text."""
        state.new_text += state.pending
        state.pending = ""

    @staticmethod
    def take(state: DetokenizerState) -> str:
        """The text emitted since the last call."""
        text, state.new_text = state.new_text, ""
        return text

    def _decode_step(self, state: DetokenizerState) -> str:
        decode = self.tokenizer.decode
        skip = state.skip_special_tokens
        prefix_text = decode(state.token_ids[state.prefix_offset:state.read_offset], skip_special_tokens=skip)
        new_text = decode(state.token_ids[state.prefix_offset:], skip_special_tokens=skip)
        piece = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            state.prefix_offset = state.read_offset
            state.read_offset = len(state.token_ids)
        # keep the window short so each step decodes a handful of tokens
        if len(state.token_ids) > 64 and state.prefix_offset > 32:
            cut = state.prefix_offset
            del state.token_ids[:cut]
            state.prefix_offset -= cut
            state.read_offset -= cut
        return piece

    def _check_stop(self, state: DetokenizerState) -> bool:
        # emitted text never ends in a stop string's prefix (it is held back), so a match lies in `pending`
        best = None
        for s in state.stop:
            pos = state.pending.find(s)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return False
        pos, s = best
        state.new_text += state.pending[: pos + len(s)] if state.include_stop_str else state.pending[:pos]
        state.pending = ""
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
