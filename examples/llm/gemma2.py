"""A tiny gemma2 decoder with a static KV cache: `aotpack build examples/llm/gemma2.py -o gemma2.pack`, then
`python examples/llm/generate.py gemma2.pack --prompt-ids 5,17,42 --max-new-tokens 32`."""
from decoders import model_file

model, example_inputs, example_kwargs, dynamic_shapes = model_file("gemma2")
