"""Structured outputs and function calling: grammar-constrained decoding with xgrammar.

- spec.py: `StructuredOutputSpec` and `spec_from_response_format` (validation, bounds, 400s)
- backend.py: `GrammarBackend` (compile + cache) and `RequestMatcher` (one per sequence)
- bitmask.py: the sampler's hooks: `build_grammar_bitmask`, `apply_bitmask`, `advance`, `fill_draft_bitmask`
- manager.py: `StructuredOutputManager`, the engine side's one owner of matchers: a step's bitmask, advancing
- tools.py / tool_parser.py: tools in the prompt, tool-call grammars, tool-call and reasoning parsers
xgrammar is imported lazily: importing this package costs nothing for unconstrained serving.
"""

from ember.structured.spec import StructuredOutputSpec, spec_from_response_format

__all__ = ["StructuredOutputSpec", "spec_from_response_format"]
