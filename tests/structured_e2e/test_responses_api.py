"""/v1/responses with the official openai SDK's `responses.create`, unmodified: plain text, a stream, a function
tool call (and its result fed back), and a json_schema format, on the default model. The reference is the
chat path through the same SDK (greedy: the same text), and jsonschema for arguments and structured output."""

import json

import jsonschema
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER, "strict": True}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def test_plain_and_streamed_text_match_chat(client):
    kw = {"temperature": 0.0}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Name a color."}], max_tokens=12, **kw)
    resp = client.responses.create(model=MODEL, instructions="Be brief.", input="Name a color.", max_output_tokens=12, **kw)
    assert resp.object == "response" and resp.output[0].type == "message"
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens and resp.usage.output_tokens == chat.usage.completion_tokens
    assert (resp.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    events = list(client.responses.create(model=MODEL, instructions="Be brief.", input="Name a color.",
                                          max_output_tokens=12, stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == resp.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == resp.usage.output_tokens


def test_function_call_round_trip(client):
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    kw = {"tools": [TOOL], "tool_choice": "required", "temperature": 0.0, "max_output_tokens": 60, "parallel_tool_calls": False}
    resp = client.responses.create(model=MODEL, input=ask, **kw)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    assert len(calls) == 1  # parallel_tool_calls false
    events = list(client.responses.create(model=MODEL, input=ask, stream=True, **kw))
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and streamed == done[0].arguments == calls[0].arguments
    follow = ask + [{"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
                    {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 21}'}]
    answer = client.responses.create(model=MODEL, input=follow, tools=[TOOL], tool_choice="none", max_output_tokens=2)
    assert answer.output_text and not [o for o in answer.output if o.type == "function_call"]
    alone = client.responses.create(model=MODEL, input=ask, tools=[TOOL], tool_choice="none", max_output_tokens=1)
    assert answer.usage.input_tokens > alone.usage.input_tokens + 10  # the call and its result are in the prompt


def test_json_schema_format(client):
    resp = client.responses.create(model=MODEL, input="Describe a person as JSON.", max_output_tokens=80, temperature=0.0,
                                   text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(resp.output_text), PERSON)


@pytest.mark.parametrize("extra,param", [({"previous_response_id": "resp_123"}, "previous_response_id"),
                                         ({"max_output_tokens": 10**9}, "max_output_tokens"),
                                         ({"tools": [{"type": "web_search"}]}, "tools.0"),
                                         ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0")])
def test_bad_requests_name_the_responses_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**{"model": MODEL, "input": "hi", **extra})
    assert e.value.body["param"] == param, e.value.body
