"""A tiny qwen3 decoder with a static KV cache: `aotpack build examples/llm/qwen3.py -o qwen3.pack`, then
`python examples/llm/generate.py qwen3.pack --prompt-ids 5,17,42 --max-new-tokens 32`."""
from decoders import model_file

model, example_inputs, example_kwargs, dynamic_shapes = model_file("qwen3")
