"""JSON schemas of real-world shapes for the structured-output suite (the issue asks for 40+)."""

from __future__ import annotations

import enum
from typing import Literal, Optional

from pydantic import BaseModel, Field


def obj(props: dict, required: list | None = None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


S = {"type": "string"}
I = {"type": "integer"}
N = {"type": "number"}
B = {"type": "boolean"}

HAND_WRITTEN: dict[str, dict] = {
    "person": obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 150}, "email": S}),
    "person_with_address": obj({"name": S, "address": obj({"street": S, "city": S, "zip": {"type": "string",
                                "pattern": "^[0-9]{5}$"}, "country": {"enum": ["US", "FR", "DE", "JP"]}})}),
    "order": obj({"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}, "items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": obj({
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1},
            "price": {"type": "number", "minimum": 0}})}}),
    "status_enum": obj({"status": {"enum": ["pending", "shipped", "delivered", "cancelled"]}}),
    "weather_args": obj({"location": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}, required=["location"]),
    "any_of_scalar": obj({"id": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "integer"}]}}),
    "nullable_union_type": obj({"nickname": {"type": ["string", "null"]}, "score": {"type": ["number", "null"]}}),
    "recursive_tree": {"$ref": "#/$defs/node", "$defs": {"node": obj({"name": {"type": "string", "maxLength": 10},
                       "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}})}},
    "calendar_event": obj({"title": S, "date": {"type": "string", "format": "date"},
                           "attendees": {"type": "array", "items": S, "maxItems": 4},
                           "all_day": B}),
    "product_catalog": obj({"products": {"type": "array", "maxItems": 3, "items": obj({
        "name": S, "price": {"type": "number", "exclusiveMinimum": 0}, "tags": {"type": "array", "items": S,
                                                                                 "maxItems": 3},
        "in_stock": B})}}),
    "boolean_flags": obj({"dark_mode": B, "beta": B, "notifications": obj({"email": B, "sms": B})}),
    "const_discriminator": obj({"type": {"const": "invoice"}, "number": I}),
    "one_of_shapes": obj({"shape": {"oneOf": [
        obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}),
        obj({"kind": {"const": "rect"}, "width": N, "height": N})]}}),
    "string_lengths": obj({"code": {"type": "string", "minLength": 2, "maxLength": 5},
                           "note": {"type": "string", "maxLength": 12}}),
    "number_bounds": obj({"pct": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
                          "ratio": {"type": "number", "minimum": -1, "maximum": 1}}),
    "negative_integers": obj({"delta": {"type": "integer", "minimum": -10, "maximum": -1}}),
    "matrix": obj({"rows": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": I}}}),
    "string_map": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "tuple_prefix_items": obj({"point": {"type": "array", "prefixItems": [S, I], "items": False}}),
    "null_field": obj({"deleted_at": {"type": "null"}, "id": I}),
    "top_level_array": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj({"q": S, "a": S})},
    "top_level_enum": {"enum": ["yes", "no", "maybe"]},
    "top_level_pattern": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"},
    "top_level_integer": {"type": "integer", "minimum": 100, "maximum": 999},
    "optional_properties": obj({"id": I, "label": S, "color": S, "size": N}, required=["id"]),
    "sentiment": obj({"label": {"enum": ["positive", "negative", "neutral"]},
                      "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    "entity_extraction": obj({"entities": {"type": "array", "maxItems": 3, "items": obj({
        "text": S, "type": {"enum": ["PERSON", "ORG", "LOC"]}, "start": {"type": "integer", "minimum": 0},
        "end": {"type": "integer", "minimum": 0}})}}),
    "sql_query": obj({"query": S, "tables": {"type": "array", "items": S, "maxItems": 3}}),
    "resume": obj({"name": S, "education": {"type": "array", "maxItems": 2, "items": obj({
        "school": S, "year": {"type": "integer", "minimum": 1950, "maximum": 2030}})},
        "experience": {"type": "array", "maxItems": 2, "items": obj({"company": S, "role": S,
                                                                     "current": B})}}),
    "recipe": obj({"title": S, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                   "ingredients": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj({
                       "name": S, "amount": N, "unit": {"enum": ["g", "ml", "tsp", "cup"]}})},
                   "steps": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    "geojson_point": obj({"type": {"const": "Point"}, "coordinates": {"type": "array", "items": N,
                                                                     "minItems": 2, "maxItems": 2}}),
    "invoice_definitions": {"type": "object", "properties": {"lines": {"type": "array", "maxItems": 2, "items": {
        "$ref": "#/definitions/line"}}, "total": N}, "required": ["lines", "total"], "additionalProperties": False,
        "definitions": {"line": obj({"desc": S, "amount": N})}},
    "moderation": obj({"flagged": B, "categories": obj({"hate": B, "violence": B, "self_harm": B}),
                       "scores": obj({"hate": N, "violence": N})}),
    "translation": obj({"source_lang": {"type": "string", "pattern": "^[a-z]{2}$"},
                        "target_lang": {"type": "string", "pattern": "^[a-z]{2}$"}, "text": S}),
    "numeric_enum": obj({"priority": {"enum": [1, 2, 3]}, "mixed": {"enum": ["a", 1, None, True]}}),
    "k8s_container": obj({"name": {"type": "string", "pattern": "^[a-z0-9-]{1,20}$"}, "image": S,
                          "ports": {"type": "array", "maxItems": 2, "items": obj({
                              "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                              "protocol": {"enum": ["TCP", "UDP"]}})}}),
    "search_filters": obj({"filters": {"type": "array", "maxItems": 2, "items": obj({
        "field": S, "op": {"enum": ["eq", "lt", "gt", "contains"]},
        "value": {"anyOf": [S, N, B]}})}}),
    "deep_nesting": obj({"a": obj({"b": obj({"c": obj({"d": obj({"e": I})})})})}),
    "email_draft": obj({"to": {"type": "array", "items": S, "minItems": 1, "maxItems": 3},
                        "subject": {"type": "string", "maxLength": 30}, "body": S}),
    "integer_multiple_of": obj({"batch": {"type": "integer", "multipleOf": 8, "minimum": 8, "maximum": 64}}),
    "empty_object": {"type": "object", "properties": {}, "additionalProperties": False},
    "top_level_boolean": {"type": "boolean"},
    "array_of_enums": obj({"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "maxItems": 3}}),
}


class Role(str, enum.Enum):
    admin = "admin"
    user = "user"
    guest = "guest"


class Address(BaseModel):
    street: str
    city: str
    postcode: Optional[str] = None


class User(BaseModel):
    id: int = Field(ge=1)
    name: str = Field(max_length=20)
    role: Role
    address: Optional[Address] = None


class LineItem(BaseModel):
    product: str
    quantity: int = Field(ge=1, le=10)
    unit_price: float = Field(ge=0)


class Cart(BaseModel):
    items: list[LineItem] = Field(max_length=3)
    coupon: Optional[str] = None


class Step(BaseModel):
    explanation: str
    output: str


class MathReasoning(BaseModel):  # OpenAI's structured-outputs cookbook example
    steps: list[Step] = Field(max_length=3)
    final_answer: str


class Ticket(BaseModel):
    kind: Literal["bug", "feature", "question"]
    severity: int = Field(default=3, ge=1, le=5)
    labels: list[str] = Field(default_factory=list, max_length=3)


class Metrics(BaseModel):
    values: dict[str, float] = Field(max_length=3)
    unit: Literal["ms", "s"]


PYDANTIC = {f"pydantic_{m.__name__.lower()}": m.model_json_schema()
            for m in (User, Cart, MathReasoning, Ticket, Metrics, Address)}

SCHEMAS: dict[str, dict] = {**HAND_WRITTEN, **PYDANTIC}
