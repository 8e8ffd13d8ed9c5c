"""The `openai` Python package against `kfrun serve` (tools/tests/serve.rs runs this with the
server's base URL): a completion, the same request streamed, the model list, and an error
surfacing as the client's exception. Prints "ok" when every check holds."""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
models = client.models.list()
name = models.data[0].id
c = client.completions.create(model=name, prompt="The king", max_tokens=12, seed=3)
assert c.choices[0].finish_reason == "length", c
assert c.usage.completion_tokens == 12, c.usage
text = "".join(
    ch.choices[0].text
    for ch in client.completions.create(
        model=name, prompt="The king", max_tokens=12, seed=3, stream=True
    )
)
assert text == c.choices[0].text, (text, c.choices[0].text)
# the K-Forcing extensions go in extra_body
k1 = client.completions.create(
    model=name, prompt="The king", max_tokens=6, seed=3, extra_body={"k": 1}
)
assert k1.usage.completion_tokens == 6
try:
    client.completions.create(model=name, prompt="x", max_tokens=2, extra_body={"k": 99})
    raise SystemExit("k = 99 was accepted")
except openai.BadRequestError as e:
    assert "'k'" in str(e), e
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
print("ok", repr(c.choices[0].text))
