"""Baseten's own Engine-Builder-LLM client examples, run unchanged against `ember serve` on the default model.

A Baseten user's first act is to paste these and point `base_url` at the server. Each example below is
Baseten's code as published (text kept verbatim in a string), with one mechanical change: the Baseten
URL becomes this server's. They send `model="not-required"`, `"baseten"` or `"model"`: Baseten routes by
URL and ember serves the base model for any name that is no LoRA adapter. Where an example leaves
`max_tokens` open, the server's `runtime.request_default_max_tokens` keeps the run short; the code is
not touched. One number is changed: the chat example's `max_tokens=500` becomes 32 (500 sampled tokens
cost a minute on the shared 2-core CPU this suite runs on). The examples set no temperature, so the server's
sampling defaults apply: this server's config sets `ember.sampling_defaults: {temperature: 0}` (greedy), as a
deployer of a 135M model would (at OpenAI's temperature 1 it writes gibberish and runs on inside JSON strings
past any short budget), and it makes every example's output reproducible. The server runs in float32: in
bf16 the User example's closing token is an exact tie between `"}` and `}` (logprob -0.86 each), and greedy's
tie-break takes `}`, which continues the string; in float32 `"}` leads (-0.80 vs -0.89). The client code is
not touched.

Sources (docs.baseten.co):
- engines/engine-builder-llm/overview: "Integration examples" (chat) and "Structured outputs" (parse, User)
- inference/structured-outputs: "Generate structured output" (parse, Task), linked from the overview
- inference/calling-your-model: "OpenAI SDK" (streaming)
- inference/function-calling: "Call the model" + "Parse and execute tool calls" (tools, sent to the chat route)
- inference/performance-client: "Batch POST". Not runnable as published: its payload dicts hold
  `stream="false"` (a syntax error; here `"stream": False`) and it passes `max_concurrent_requests`,
  `timeout_s`, `hedge_delay`, which baseten-performance-client 0.1.16 takes in a `preference` object
  (left at its default here). The payloads are kept, the second one with "input" instead of "prompt"
  (OpenAI's prompt is optional: absent, the completion starts from the start-of-text token).
The stored copy of the overview page has two code examples (chat, parse); the others come from the
pages it links for structured outputs, streaming, function calling and the Performance Client. The
function-calling page posts to Baseten's `/production/predict` route, which on Engine-Builder-LLM is the
chat completions route; that URL becomes this server's `/v1/chat/completions`.
"""

from __future__ import annotations

import functools
import io
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from e2e_server import real_server

BASETEN = "https://model-xxxxxx.api.baseten.co/environments/production/sync"

OVERVIEW_CHAT = '''
import os
from openai import OpenAI

client = OpenAI(
    api_key=os.environ['BASETEN_API_KEY'],
    base_url="https://model-xxxxxx.api.baseten.co/environments/production/sync/v1"
)

response = client.chat.completions.create(
    model="not-required",
    messages=[{"role": "user", "content": "Explain quantum computing in simple terms."}],
    temperature=0.7,
    max_tokens=32
)

print(response.choices[0].message.content)
'''

OVERVIEW_PARSE_USER = '''
import os
from pydantic import BaseModel
from openai import OpenAI

class User(BaseModel):
    name: str
    age: int
    email: str

client = OpenAI(
    api_key=os.environ['BASETEN_API_KEY'],
    base_url="https://model-xxxxxx.api.baseten.co/environments/production/sync/v1"
)

response = client.beta.chat.completions.parse(
    model="not-required",
    messages=[
        {"role": "user", "content": "Extract user info from: John is 25 years old and his email is john@example.com"}
    ],
    response_format=User
)

user = response.choices[0].message.parsed
print(f"Name: {user.name}, Age: {user.age}, Email: {user.email}")
'''

STRUCTURED_PARSE_TASK = '''
import os
from pydantic import BaseModel
from openai import OpenAI

class Task(BaseModel):
    title: str
    priority: str
    due_date: str
    description: str

client = OpenAI(
    api_key=os.environ['BASETEN_API_KEY'],
    base_url="https://model-xxxxxx.api.baseten.co/environments/production/sync/v1"
)

response = client.beta.chat.completions.parse(
    model="not-required",
    messages=[
        {"role": "user", "content": "Create a task for: Review the quarterly report by next Friday"}
    ],
    response_format=Task
)

task = response.choices[0].message.parsed
print(f"Task: {task.title}")
print(f"Priority: {task.priority}")
'''

CALLING_STREAM = '''
import os
from openai import OpenAI

model_id = "abcdef" # TODO: replace with your model id
api_key = os.environ.get("BASETEN_API_KEY")
model_url = f"https://model-{model_id}.api.baseten.co/environments/production/sync/v1"

client = OpenAI(
    base_url=model_url,
    api_key=api_key,
)

stream = client.chat.completions.create(
    model="baseten",
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}
    ],
    stream=True,
)

for chunk in stream:
    if chunk.choices[0].delta.content is not None:
        print(chunk.choices[0].delta.content, end="")
'''

FUNCTION_CALLING = '''
def multiply(a: float, b: float):
    """Multiply two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b


def divide(a: float, b: float):
    """Divide two numbers.

    Args:
        a: The dividend.
        b: The divisor (must be non-zero).
    """
    return a / b


def add(a: float, b: float):
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def subtract(a: float, b: float):
    """Subtract two numbers.

    Args:
        a: The number to subtract from.
        b: The number to subtract.
    """
    return a - b

from transformers.utils import get_json_schema

calculator_functions = {
    "multiply": multiply,
    "divide": divide,
    "add": add,
    "subtract": subtract,
}

tools = [get_json_schema(f) for f in calculator_functions.values()]

import requests

payload = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 3.14 + 3.14?"},
    ],
    "tools": tools,
    "tool_choice": "auto",  # default
}

MODEL_ID = ""
BASETEN_API_KEY = ""

resp = requests.post(
    f"https://model-{MODEL_ID}.api.baseten.co/production/predict",
    headers={"Authorization": f"Bearer {BASETEN_API_KEY}"},
    json=payload,
)

import json

data = resp.json()
message = data["choices"][0]["message"]

tool_calls = message.get("tool_calls") or []

for tool_call in tool_calls:
    name = tool_call["function"]["name"]
    args = json.loads(tool_call["function"]["arguments"])

    # Validate args in production.
    result = calculator_functions[name](**args)
    print(result)
'''

PERFORMANCE_CLIENT_BATCH_POST = '''
import os
from baseten_performance_client import PerformanceClient

client = PerformanceClient(
    base_url="https://model-xxxxxx.api.baseten.co/environments/production/sync",
    api_key=os.environ["BASETEN_API_KEY"],
)

# requires stream=false / non-sse response.
payloads = [
    {"model": "my_model", "prompt": "Batch request 1", "stream": False},
    {"model": "my_model", "input": "Batch request 2", "stream": False}
] * 10

response = client.batch_post(
    url_path="/v1/completions",
    payloads=payloads,
)
responses = response.data # array with 20 dicts
print(len(responses), [r["choices"][0]["text"] for r in responses])
'''


@pytest.fixture(scope="module")
def server():
    # no api_key on the server: the examples' keys are whatever the environment holds
    with real_server(request_default_max_tokens=96, dtype="float32", sampling_defaults={"temperature": 0.0}) as s:
        yield s


def run_example(code: str, url: str) -> str:
    """exec Baseten's code with only its URL pointed at this server; returns what it printed."""
    code = (code.replace(BASETEN, url)
            .replace('f"https://model-{model_id}.api.baseten.co/environments/production/sync/v1"', f'"{url}/v1"')
            .replace('f"https://model-{MODEL_ID}.api.baseten.co/production/predict"', f'"{url}/v1/chat/completions"'))
    assert "baseten.co" not in code
    printed = io.StringIO()
    # print goes to this example's own buffer (the examples run at once, on threads)
    env = {"__name__": "baseten_example", "print": functools.partial(print, file=printed)}
    exec(compile(code, "<baseten example>", "exec"), env)
    return printed.getvalue()


def test_baseten_examples_run_unchanged(server, monkeypatch):
    """All examples at once (the server batches them), each checked on what it printed."""
    monkeypatch.setenv("BASETEN_API_KEY", "unused-by-this-server")
    examples = [OVERVIEW_CHAT, OVERVIEW_PARSE_USER, STRUCTURED_PARSE_TASK, CALLING_STREAM, FUNCTION_CALLING,
                PERFORMANCE_CLIENT_BATCH_POST]
    with ThreadPoolExecutor(len(examples)) as pool:
        chat, user, task, stream, tools, batch = pool.map(lambda code: run_example(code, server.url), examples)
    assert chat.strip() and stream.strip()
    assert user.startswith("Name: ") and ", Age: " in user and ", Email: " in user
    lines = task.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Task: ") and lines[1].startswith("Priority: "), task
    for line in tools.splitlines():  # each tool call the model made was executed and printed a number
        float(line)
    assert batch.startswith("20 [")
