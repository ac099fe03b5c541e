"""Local inference with llama.cpp (through llama-cpp-python), constrained to a JSON schema.

``LlamaBackend`` loads one GGUF model once and generates chat completions with it. With a schema, the
completion is constrained by a grammar compiled from the schema (cached per schema), then checked
against the schema again: a completion that does not match raises ``InvalidOutput``, which carries the
raw text and the token counts so that the caller can still charge for it and tell the agent why.

Schemas: llama-cpp-python's JSON-schema converter ignores ``minLength``, ``maxLength``, ``minimum``,
``maximum``, ``minItems``/``maxItems`` and friends, and its plain strings admit raw control
characters. A string or a number the grammar does not bound lets a small model ramble until
``max_tokens`` cuts the JSON short. So:

- bound every string with an anchored ``pattern`` (``"^[a-z]{1,12}$"``), which the grammar enforces;
- give small integers as an ``enum`` (``{"enum": [1, 2, 5]}``);
- use ``const``/``enum`` for tags and ``anyOf`` for unions of objects.

``check_schema`` still checks the bounds the grammar cannot (a ``maxLength`` the converter ignored is
caught here, and reported as invalid output rather than passed on).

The types here (``Generation``, ``InvalidOutput``, ``check_schema``) are shared with
``native.openai``; ``llama_cpp`` itself is imported only when a ``LlamaBackend`` is made, so a node
that talks to an inference server does not need it.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from native.sampling import Candidates, Completion, FinishReason, Forcing, Sampler
from runtime.errors import AecoError, ErrorCode

if TYPE_CHECKING:
    from llama_cpp import Llama

#: Grammars kept per backend; the runtime uses a handful of schemas, so this only bounds a misuse.
GRAMMAR_CACHE_SIZE = 64
#: What ``generate`` accepts as a schema: parsed, or JSON bytes as they travel in a ``Think`` task.
Schema = Mapping[str, Any] | bytes


class Generation(msgspec.Struct, frozen=True):
    """One completion and what it cost in tokens (as counted by the model's own tokenizer)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    #: ``stop``: the model (or the grammar) ended it; ``length``: ``max_tokens`` cut it off.
    finish_reason: FinishReason
    #: Price of the tokens at the configured rates (``native.openai``); 0 for local inference.
    cost_usd: float = 0.0


class InferenceError(AecoError, RuntimeError):
    """Generation could not run (model failed to load, prompt too long, server unreachable …)."""

    default_code: ErrorCode = "inference"


class SchemaError(AecoError, ValueError):
    """The JSON schema given for a generation is not valid JSON or cannot be compiled to a grammar."""

    default_code: ErrorCode = "invalid_schema"


class InvalidOutput(AecoError, ValueError):
    """The completion does not match the schema. The tokens were still spent: see ``generation``."""

    default_code: ErrorCode = "invalid_output"

    def __init__(self, reason: str, generation: Generation) -> None:
        super().__init__(f"output does not match the schema: {reason}; raw output: {generation.text[:200]!r}")
        self.reason = reason
        self.generation = generation

    @property
    def text(self) -> str:
        """The raw completion."""
        return self.generation.text


# ----------------------------------------------------------------------------- schema checking


#: The converter's whitespace rule (``space ::= " "?``, after every literal of the JSON).
_SPACE_RULE = re.compile(r"^space ::= .*$", re.MULTILINE)


def compact_grammar(gbnf: str) -> str:
    """``gbnf``, made by llama-cpp-python's JSON-schema converter, with no whitespace between the JSON's
    tokens: the converter allows one space after every literal, which SmolLM2 takes before most keys and
    values (``{ "kind": "transfer", "to": "a4", ...}``: 30 tokens where the compact JSON is 22), and every
    token is a decode step. Spaces inside strings are the strings' own (their patterns)."""
    return _SPACE_RULE.sub('space ::= ""', gbnf)


def parse_schema(schema: Schema | None) -> tuple[bytes, dict[str, Any]] | None:
    """Canonical bytes (the cache key) and the parsed schema; None for no schema (free text)."""
    if schema is None or (isinstance(schema, bytes | bytearray) and not schema.strip()):
        return None
    if isinstance(schema, bytes | bytearray):
        key = bytes(schema)
        try:
            parsed = msgspec.json.decode(key)
        except msgspec.DecodeError as exc:
            raise SchemaError(f"the schema is not valid JSON: {exc}") from None
    else:
        parsed = dict(schema)
        key = msgspec.json.encode(parsed, order="sorted")
    if not isinstance(parsed, dict):
        raise SchemaError(f"the schema must be a JSON object, not {type(parsed).__name__}")
    return key, parsed


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


def check_schema(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None, at: str = "$") -> None:
    """Raise ``ValueError`` saying where and why ``value`` does not match ``schema``.

    Covers the subset of JSON Schema that makes sense for constrained generation: ``type``,
    ``const``, ``enum``, ``anyOf``/``oneOf``/``allOf``, ``properties``/``required``/
    ``additionalProperties``, ``items``/``prefixItems``, ``pattern``, the length, size and range
    bounds, and local ``$ref`` (``#/$defs/…``, ``#/definitions/…``). Other keywords are ignored.
    """
    root = schema if root is None else root
    if "$ref" in schema:
        schema = _resolve(schema["$ref"], root, at)
    if "const" in schema and not _same(value, schema["const"]):
        raise ValueError(f"{at}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        raise ValueError(f"{at}: {value!r} is not one of {schema['enum']!r}")
    if "type" in schema:
        _check_type(value, schema["type"], at)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            reasons = []
            for option in schema[key]:
                try:
                    check_schema(value, option, root, at)
                except ValueError as exc:
                    reasons.append(str(exc))
                else:
                    break
            else:
                raise ValueError(f"{at}: matches none of the {len(schema[key])} alternatives ({'; '.join(reasons)})")
    for option in schema.get("allOf", ()):
        check_schema(value, option, root, at)
    if isinstance(value, dict):
        _check_object(value, schema, root, at)
    elif isinstance(value, list):
        _check_array(value, schema, root, at)
    elif isinstance(value, str):
        _check_string(value, schema, at)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(value, schema, at)


def _resolve(ref: str, root: Mapping[str, Any], at: str) -> Mapping[str, Any]:
    node: Any = root
    if not ref.startswith("#"):
        raise ValueError(f"{at}: only local $ref are supported, not {ref!r}")
    for part in ref.lstrip("#").strip("/").split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{at}: $ref {ref!r} points nowhere")
        node = node[part]
    if not isinstance(node, Mapping):
        raise ValueError(f"{at}: $ref {ref!r} is not a schema")
    return node


def _same(a: Any, b: Any) -> bool:
    # JSON equality: 1 and 1.0 are the same number, but true is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _check_type(value: Any, expected: str | list[str], at: str) -> None:
    names = [expected] if isinstance(expected, str) else list(expected)
    for name in names:
        types = _JSON_TYPES.get(name)
        if types is None:
            continue
        if isinstance(value, bool) and name not in ("boolean",):
            continue
        if name == "integer" and isinstance(value, float) and value.is_integer():
            return
        if isinstance(value, types):
            return
    raise ValueError(f"{at}: expected {' or '.join(names)}, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types) and not (isinstance(value, bool) and name != "boolean"):
            return name
    return type(value).__name__


def _check_object(value: dict[str, Any], schema: Mapping[str, Any], root: Mapping[str, Any], at: str) -> None:
    props: Mapping[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            raise ValueError(f"{at}: missing required property {name!r}")
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        where = f"{at}.{name}"
        if name in props:
            check_schema(item, props[name], root, where)
        elif extra is False:
            raise ValueError(f"{at}: unexpected property {name!r}")
        elif isinstance(extra, Mapping):
            check_schema(item, extra, root, where)
    _check_bounds(len(value), schema, "minProperties", "maxProperties", "properties", at)


def _check_array(value: list[Any], schema: Mapping[str, Any], root: Mapping[str, Any], at: str) -> None:
    prefix: list[Any] = schema.get("prefixItems", [])
    for i, item in enumerate(value):
        if i < len(prefix):
            check_schema(item, prefix[i], root, f"{at}[{i}]")
        elif isinstance(schema.get("items"), Mapping):
            check_schema(item, schema["items"], root, f"{at}[{i}]")
    _check_bounds(len(value), schema, "minItems", "maxItems", "items", at)


def _check_string(value: str, schema: Mapping[str, Any], at: str) -> None:
    pattern = schema.get("pattern")
    if pattern is not None and re.search(pattern, value) is None:
        raise ValueError(f"{at}: {value!r} does not match the pattern {pattern!r}")
    _check_bounds(len(value), schema, "minLength", "maxLength", "characters", at)


def _check_number(value: float, schema: Mapping[str, Any], at: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{at}: {value!r} is not a finite number")
    if "minimum" in schema and value < schema["minimum"]:
        raise ValueError(f"{at}: {value!r} is below the minimum {schema['minimum']!r}")
    if "maximum" in schema and value > schema["maximum"]:
        raise ValueError(f"{at}: {value!r} is above the maximum {schema['maximum']!r}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise ValueError(f"{at}: {value!r} is not above {schema['exclusiveMinimum']!r}")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        raise ValueError(f"{at}: {value!r} is not below {schema['exclusiveMaximum']!r}")


def _check_bounds(n: int, schema: Mapping[str, Any], low: str, high: str, unit: str, at: str) -> None:
    if low in schema and n < schema[low]:
        raise ValueError(f"{at}: {n} {unit}, fewer than {low} {schema[low]}")
    if high in schema and n > schema[high]:
        raise ValueError(f"{at}: {n} {unit}, more than {high} {schema[high]}")


def validate(generation: Generation, schema: Mapping[str, Any]) -> Any:
    """Decode the completion as JSON (msgspec) and check it against ``schema``; return the value.

    Raises ``InvalidOutput`` carrying the generation when it is not JSON or does not match.
    """
    # The grammar was still open when the tokens ran out: say so rather than "bad JSON".
    why = "cut off at max_tokens before the JSON was complete" if generation.finish_reason == "length" else ""
    try:
        value = msgspec.json.decode(generation.text)
    except msgspec.DecodeError as exc:
        raise InvalidOutput(why or f"not valid JSON ({exc})", generation) from None
    try:
        check_schema(value, schema)
    except ValueError as exc:
        raise InvalidOutput(str(exc), generation) from None
    return value


def finish_reason(value: object) -> FinishReason:
    """A response's ``finish_reason`` as one of ours (anything unexpected becomes ``""``)."""
    if value == "stop":
        return "stop"
    if value == "length":
        return "length"
    return ""


def messages(system: str, prompt: str) -> list[dict[str, str]]:
    """The chat messages of one generation; an empty system prompt is left out."""
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": prompt})
    return out


# ------------------------------------------------------------------------------------- backend


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LlamaBackend:
    """One GGUF model loaded once, generating chat completions, optionally constrained to a schema.

    ``n_threads`` is used for both prompt processing and generation: on a small machine more threads
    cost more CPU per token, and the worker is charged for all of them. The model file is mmapped
    (llama.cpp's default), so its pages are shared and counted once per worker.
    Not for concurrent use: calls are serialised by a lock.

    Tokens are sampled by ``native.sampling.Sampler`` (the grammar checks the token drawn; with
    ``grammar_first``, it is applied to every candidate first, as llama-cpp-python does).
    """

    def __init__(
        self, path: str | Path, *, n_threads: int = 1, n_ctx: int = 2048, seed: int = 0, grammar_first: bool = False
    ) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise InferenceError(
                f"llama-cpp-python is not installed ({exc}); install it with `pip install llama-cpp-python`"
            ) from None
        self.path = Path(path)
        if not self.path.is_file():
            raise InferenceError(f"model file {str(self.path)!r} does not exist")
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.grammar_first = grammar_first
        try:
            self.llm: Llama = Llama(
                model_path=str(self.path),
                n_threads=n_threads,
                n_threads_batch=n_threads,  # defaults to every CPU, which would bill the prompt to all cores
                n_ctx=n_ctx,
                seed=seed,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise InferenceError(f"llama.cpp could not load {str(self.path)!r}: {exc}") from None
        self.vocab = self.llm._model.vocab
        #: Schema bytes -> a grammar sampler in its initial state, cloned for each generation (parsing
        #: the grammar again would cost more than the clone).
        self._grammars: dict[bytes, Any] = {}
        self._candidates = Candidates(self.llm.n_vocab())
        self._forcing: Forcing | None = None
        self._lock = threading.Lock()
        #: Tokens in the context when the last generation was interrupted (prompt and completion so
        #: far): what an interrupted generation spent, for whoever charges it.
        self.interrupted_tokens = 0

    def _grammar(self, key: bytes, schema: Mapping[str, Any]) -> Any:
        """A fresh grammar sampler for ``schema`` (cloned from the one cached under its bytes ``key``)."""
        import llama_cpp

        proto = self._grammars.get(key)
        if proto is None:
            from llama_cpp.llama_grammar import LlamaGrammar

            try:
                gbnf = LlamaGrammar.from_json_schema(msgspec.json.encode(schema).decode(), verbose=False)
            except Exception as exc:  # the converter raises bare Exceptions, ValueErrors, KeyErrors …
                raise SchemaError(f"the schema cannot be compiled to a grammar: {type(exc).__name__}: {exc}") from None
            text = compact_grammar(gbnf._grammar)
            proto = llama_cpp.llama_sampler_init_grammar(self.vocab, text.encode(), gbnf._root.encode())
            if not proto:
                raise SchemaError("the schema's grammar does not parse in llama.cpp")
            if len(self._grammars) >= GRAMMAR_CACHE_SIZE:  # the oldest goes: dicts keep insertion order
                llama_cpp.llama_sampler_free(self._grammars.pop(next(iter(self._grammars))))
            self._grammars[key] = proto
        return llama_cpp.llama_sampler_clone(proto)

    def completion(
        self, schema: Schema | None, *, max_tokens: int, temperature: float, seed: int, stops: Sequence[str]
    ) -> Completion:
        """An empty completion with its own sampler (constrained to ``schema`` if given); the caller
        closes its sampler."""
        parsed = parse_schema(schema)
        grammar = self._grammar(*parsed) if parsed is not None else None
        sampler = Sampler(
            grammar,
            self._candidates,
            temperature=temperature,
            seed=seed,
            grammar_first=self.grammar_first,
        )
        stop_bytes = [s.encode() for s in stops if s]
        return Completion(sampler, stop_bytes, max_tokens, self.vocab, json_end=parsed is not None)

    @property
    def forcing(self) -> Forcing:
        """What a grammar forces next, for this model's vocabulary (``native.sampling.Forcing``; made on
        first use)."""
        if self._forcing is None:
            self._forcing = Forcing(self.vocab, self.llm.n_vocab())
        return self._forcing

    def chat_tokens(self, system: str, prompt: str) -> tuple[list[int], list[str]]:
        """The prompt's tokens and stop strings, exactly as ``Llama.create_chat_completion`` makes them."""
        from llama_cpp import llama_chat_format

        llm = self.llm
        name = llm.chat_format or ""
        formatter: Callable[..., Any]
        if name.startswith("chat_template."):
            template = llm.metadata["tokenizer." + name.removesuffix(".default")]
            eos, bos = llm.token_eos(), llm.token_bos()
            jinja = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
            formatter = jinja
        elif name in _FORMATTERS:
            formatter = getattr(llama_chat_format, _FORMATTERS[name])
        else:
            raise InferenceError(f"no chat formatter is known for the chat format {name!r} of this model")
        result = formatter(messages=messages(system, prompt))  # type: ignore[arg-type]
        tokens = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
        stop = result.stop
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        return tokens, stops

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in this model's vocabulary (special tokens such as ``<|im_end|>`` parsed)."""
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def close(self) -> None:
        """Free the model now (llama-cpp-python's own finaliser fails when it runs at interpreter exit)."""
        import llama_cpp

        while self._grammars:
            llama_cpp.llama_sampler_free(self._grammars.popitem()[1])
        self.llm.close()

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
        """Generate one chat completion; with ``schema``, constrained to it and then validated.

        Raises ``InvalidOutput`` (with the generation) if the completion does not match the schema,
        ``SchemaError`` if the schema is unusable, ``InferenceError`` if llama.cpp refuses (for
        instance a prompt longer than the context).
        """
        parsed = parse_schema(schema)
        tokens, stops = self.chat_tokens(system, prompt)
        if len(tokens) + max_tokens > self.n_ctx:
            raise InferenceError(
                f"the prompt's {len(tokens)} tokens and max_tokens {max_tokens} exceed the context window "
                f"of {self.n_ctx} tokens"
            )
        with self._lock:
            completion = self.completion(schema, max_tokens=max_tokens, temperature=temperature, seed=seed, stops=stops)
            try:
                self._decode(tokens, completion)
            except BaseException:
                # Interrupted part-way (a worker's cancel signal raises between two tokens): the
                # model's token bookkeeping may be a step off its KV cache, so the next generation
                # starts afresh rather than reusing a prefix.
                self.interrupted_tokens = self.llm.n_tokens
                self.llm.reset()  # type: ignore[no-untyped-call]
                raise
            finally:
                completion.sampler.close()
        generation = Generation(completion.result(), len(tokens), len(completion.out), completion.finish)
        if parsed is not None:
            validate(generation, parsed[1])
        return generation

    def _decode(self, tokens: list[int], completion: Completion) -> None:
        """Evaluate the prompt, then one token at a time until the completion ends. The context still
        holds the last generation's tokens: the part this prompt starts with is kept (as
        ``Llama.generate`` does), at least one token is evaluated again for the logits to sample from."""
        llm = self.llm
        keep = min(common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens), len(tokens) - 1)
        llm.n_tokens = keep  # ``eval`` drops the cache's cells from here on
        llm.eval(tokens[keep:])
        while completion.take(completion.sampler.sample(llm.ctx, -1)):
            llm.eval(completion.out[-1:])


#: Chat formats that ``llama_cpp.Llama`` picks by name, and their formatting functions.
_FORMATTERS = {"llama-2": "format_llama2", "chatml": "format_chatml", "llama-3": "format_llama3"}
