"""Generation: batched sampling on token ids with per-token log-probs, text streaming, and chat sessions.

    from flywheel.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer)                      # any HF causal LM; Llama/Mistral/Qwen2/Qwen3 run fast
    gen = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, temperature=1.0, seed=0))
    gen.tokens, gen.logprobs, gen.finish_reasons           # per row; logprobs = log_softmax(logits / T)[token]

The engine knows nothing about chat markup: `ChatSession` renders conversations with
`flywheel.tokenization.render_prompt` and feeds the ids in. See docs/engine.md.
"""

from flywheel.engine.engine import Engine, TextStream, context_length
from flywheel.engine.params import Generation, SamplingParams
from flywheel.engine.session import ChatSession
from flywheel.engine.stream import Detokenizer

__all__ = ["ChatSession", "Detokenizer", "Engine", "Generation", "SamplingParams", "TextStream", "context_length"]
