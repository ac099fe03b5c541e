"""Generation through an OpenAI-compatible HTTP server (llama-cpp-python's server, llama.cpp, vLLM, TGI).

The path for GPU serving: the server does the work, and the agent is charged the tokens the server
reports in ``usage`` (``prompt_tokens``, ``completion_tokens``), priced at optional per-model rates.
Completions are validated against the schema exactly as the local backend does (``native.llama``).

Only the standard library is used (``urllib``): one blocking request per generation, which suits a
worker that runs one task at a time.

How the schema reaches the server (``schema_mode``):

- ``json_object`` (default): ``response_format={"type": "json_object", "schema": …}``, what
  llama-cpp-python's server accepts (it compiles the schema to a grammar);
- ``json_schema``: the OpenAI form ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
  accepted by llama.cpp's own server, vLLM and OpenAI;
- ``grammar``: llama-cpp-python's ``grammar`` extension, a GBNF grammar compiled here (needs
  ``llama_cpp`` installed locally).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from native.llama import Generation, InferenceError, Schema, finish_reason, messages, parse_schema, validate

SchemaMode = Literal["json_object", "json_schema", "grammar"]


class Price(msgspec.Struct, frozen=True):
    """What a model's tokens cost, in US dollars per 1,000 tokens."""

    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for these token counts."""
        return (prompt_tokens * self.prompt_per_1k + completion_tokens * self.completion_per_1k) / 1000


class OpenAIBackend:
    """Chat completions from ``base_url`` (``http://host:port``, with or without ``/v1``) for ``model``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60,
        prices: Mapping[str, Price] | None = None,
        schema_mode: SchemaMode = "json_object",
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else f"{base}/v1"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.prices = dict(prices or {})
        self.schema_mode: SchemaMode = schema_mode
        self._grammars: dict[bytes, str] = {}

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise InferenceError(f"POST {url}: HTTP {exc.code} {exc.reason}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InferenceError(f"POST {url}: server unreachable: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise InferenceError(f"POST {url}: the response is not JSON: {raw[:200]!r}") from None

    def _grammar(self, key: bytes, schema: Mapping[str, Any]) -> str:
        cached = self._grammars.get(key)
        if cached is None:
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            cached = self._grammars[key] = json_schema_to_gbnf(json.dumps(schema))
        return cached

    def generate(
        self,
        system: str,
        prompt: str,
        *,
        schema: Schema | None = None,
        max_tokens: int = 256,
        temperature: float = 0.7,
        seed: int = 0,
    ) -> Generation:
        """One chat completion from the server; same contract as ``LlamaBackend.generate``.

        Raises ``InferenceError`` when the server fails or answers without ``usage`` (it could not be
        charged), ``InvalidOutput`` when the completion does not match the schema.
        """
        parsed = parse_schema(schema)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages(system, prompt),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "stream": False,
        }
        if parsed is not None:
            key, value = parsed
            if self.schema_mode == "json_object":
                body["response_format"] = {"type": "json_object", "schema": value}
            elif self.schema_mode == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": value, "strict": True},
                }
            else:
                body["grammar"] = self._grammar(key, value)
        response = self._post("/chat/completions", body)
        try:
            choice = response["choices"][0]
            text = choice["message"]["content"] or ""
            finish = finish_reason(choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError):
            raise InferenceError(f"{self.base_url}: malformed completion: {str(response)[:300]}") from None
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict) or "prompt_tokens" not in usage or "completion_tokens" not in usage:
            raise InferenceError(f"{self.base_url}: the server reported no token usage, so it cannot be charged")
        prompt_tokens, completion_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        price = self.prices.get(self.model)
        generation = Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
            cost_usd=price.cost(prompt_tokens, completion_tokens) if price else 0.0,
        )
        if parsed is not None:
            validate(generation, parsed[1])
        return generation
