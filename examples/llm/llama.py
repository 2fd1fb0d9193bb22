"""A tiny llama decoder with a static KV cache: `aotpack build examples/llm/llama.py -o llama.pack`, then
`python examples/llm/generate.py llama.pack --prompt-ids 5,17,42 --max-new-tokens 32`."""
from decoders import model_file

model, example_inputs, example_kwargs, dynamic_shapes = model_file("llama")
