"""The Responses request -> chat-completions body translation (no engine): every input item kind and field."""

import pytest

from ember.errors import InvalidRequestError
from ember.server.responses_protocol import ResponsesRequest, to_chat_body


def test_items_tools_and_format_translate():
    req = ResponsesRequest.model_validate({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0.5, "stream": True,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}]},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                  {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
                  {"type": "function_call_output", "call_id": "c1", "output": "21C"},
                  {"type": "reasoning", "id": "rs_1", "summary": []},
                  {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Warm."}]}],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
    })
    body = to_chat_body(req)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
        {"role": "assistant", "content": "Warm."}]
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}}
    assert body["max_completion_tokens"] == 7 and body["temperature"] == 0.5
    assert body["stream"] and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("fields,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
    ({"tools": [{"type": "file_search"}]}, "tools.0"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
])
def test_refusals_name_the_field(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        to_chat_body(ResponsesRequest.model_validate({"input": "hi", **fields}))
    assert e.value.param == param
