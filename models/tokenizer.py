"""Tokenizers built with the `tokenizers` library from GGUF metadata or a Hugging Face directory.

The GGUF pipelines reproduce what transformers builds for the same file
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so ids match `AutoTokenizer(gguf_file=...)`.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from models.errors import InputError, ModelFileError, UnsupportedModelError

# Tokens that end a turn in common chat templates; those present in the vocabulary become stop ids.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>")

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
MAX_CHAT_CHARS = 1 << 24  # a rendered chat prompt (and any string/list a template builds) stays below this
MAX_CHAT_STEPS = 1 << 22  # loop iterations and filter/method calls of one render
MAX_CHAT_SECONDS = 30.0  # wall-clock of one render (a backstop behind MAX_CHAT_STEPS)
MAX_TEMPLATE_CHARS = 1 << 20  # a chat template's source
# the running render's budget: [steps left, deadline, the template's name]
_RENDER = contextvars.ContextVar("_RENDER", default=None)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex, as transformers maps them. Any other value ('default', 'gpt2', 'smollm',
# ...) keeps GPT-2's own byte-level regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
         "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


@dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and chat template a model needs."""

    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    add_bos: bool
    chat_template: str | None
    stop_ids: tuple[int, ...]
    unk_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = False) -> list[int]:
        """Token ids of `text`. `add_bos=False` (default) encodes it as a fragment: `encode(" Paris")` is the
        id(s) of " Paris" alone on every model. `True` puts BOS first (when the vocabulary has one); `None`
        follows the tokenizer's convention for a whole prompt (`self.add_bos`: Gemma yes, SmolLM2 no), as
        `batch` and `Model.tokenize` do. For one id, `Model.to_single_token` checks it is exactly one."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes one string, got {type(text).__name__}; use batch() for several")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special)

    def batch(
        self, texts: Sequence[str], max_len: int | None = None, add_bos: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int32 `(tokens [B, T], mask [B, T])`, mask 1 on real tokens; T is the longest row.
        Each text is a whole prompt: BOS first by the tokenizer's convention (`add_bos=None`) unless given."""
        if isinstance(texts, str):
            raise InputError("batch() takes a sequence of strings, not a single string")
        rows = [self.encode(t, add_bos=add_bos) for t in texts]
        if not rows:
            raise InputError("batch() needs at least one text")
        for i, row in enumerate(rows):
            if max_len is not None and len(row) > max_len:
                raise InputError(f"text {i} is {len(row)} tokens long, more than max_len={max_len}")
        width = max(len(r) for r in rows)
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            if row:
                tokens[i, width - len(row):] = row
                mask[i, width - len(row):] = 1
        return tokens, mask

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` with the model's chat template, as transformers' `apply_chat_template(tokenize=False)`."""
        if not self.chat_template:
            raise InputError("this tokenizer has no chat template (a base model?); format the prompt yourself")
        variables = dict(
            bos_token=self.token(self.bos_id), eos_token=self.token(self.eos_id), pad_token=self.token(self.pad_id),
            unk_token=self.token(self.unk_id), tools=None, documents=None,
        )
        variables.update(kwargs)
        name = template_name(self.chat_template)
        if len(self.chat_template) > MAX_TEMPLATE_CHARS:
            raise InputError(f"{name} has {len(self.chat_template):,} characters, more than MAX_TEMPLATE_CHARS="
                             f"{MAX_TEMPLATE_CHARS:,}")
        import jinja2

        pieces, n = [], 0
        budget = _RENDER.set([MAX_CHAT_STEPS, time.monotonic() + MAX_CHAT_SECONDS, name])
        try:
            stream = _compile_template(self.chat_template).generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
            for piece in stream:  # streamed, so a template that repeats without bound stops at the cap
                n += len(piece)
                if n > MAX_CHAT_CHARS:
                    raise InputError(f"{name} rendered more than MAX_CHAT_CHARS={MAX_CHAT_CHARS:,} characters; "
                                     "the template (or the messages) repeat without bound")
                pieces.append(piece)
        except jinja2.TemplateSyntaxError as e:
            raise InputError(f"{name} is not a valid jinja2 template: line {e.lineno}: {e.message}") from None
        except RecursionError:
            raise InputError(f"{name} recurses without bound") from None
        finally:
            _RENDER.reset(budget)
        return "".join(pieces)


def template_name(source: str) -> str:
    """How errors name a chat template: its first line and a hash of the source."""
    head = source.strip().splitlines()[0][:40] if source.strip() else ""
    return f"the chat template {head!r}... (sha256 {hashlib.sha256(source.encode('utf-8', 'replace')).hexdigest()[:12]})"


def _spend(steps: int = 1) -> None:
    """Charge `steps` to the running render's budget (InputError naming the template once it is spent)."""
    budget = _RENDER.get()
    if budget is None:
        return
    budget[0] -= steps
    if budget[0] < 0:
        raise InputError(f"{budget[2]} did more than MAX_CHAT_STEPS={MAX_CHAT_STEPS:,} loop iterations and calls; "
                         "it loops without bound")
    if time.monotonic() > budget[1]:
        raise InputError(f"{budget[2]} ran longer than MAX_CHAT_SECONDS={MAX_CHAT_SECONDS:g} s")


def _over(size: int, what: str) -> None:
    if size > MAX_CHAT_CHARS:
        budget = _RENDER.get()
        name = budget[2] if budget else "the chat template"
        raise InputError(f"{name} builds {what} of {size:,} items, more than MAX_CHAT_CHARS={MAX_CHAT_CHARS:,}; "
                         "it repeats without bound")


_FORMAT_NUMBERS = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?|\{[^{}]*?:[^{}]*?(\d+)")


def _check_format(fmt: str, args) -> None:
    """A `%` / `str.format` format string's widths and precisions (and `*` / nested ones taken from `args`)
    stay below MAX_CHAT_CHARS before the string is built."""
    for m in _FORMAT_NUMBERS.finditer(fmt):
        for g in m.groups():
            if g and g.isdigit():
                _over(int(g), "a formatted field")
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):
        for a in args if isinstance(args, (list, tuple)) else (args,):
            if isinstance(a, int):
                _over(abs(a), "a formatted field")


def _materialise(items, what: str) -> list:
    out = []
    for x in items:
        out.append(x)
        if len(out) % 1024 == 0:
            _spend(1024)
        _over(len(out), what)
    return out


def _str_method(s: str, attr: str, method):
    """`s.<attr>` for the string methods that build strings, with the result's size checked before it is built."""
    def checked(*args, **kwargs):
        _spend()
        if attr in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            _over(args[0], f"a string (str.{attr})")
        elif attr == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            _over(len(s) + s.count("\t") * max(int(tab), 0), "a string (str.expandtabs)")
        elif attr == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            old, new = args[0], args[1]
            k = len(s) + 1 if old == "" else s.count(old)
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                k = min(k, args[2])
            _over(len(s) + k * (len(new) - len(old)), "a string (str.replace)")
        elif attr == "join" and args:
            items = _materialise(args[0], "a joined list")
            _over(sum(len(x) if isinstance(x, str) else 0 for x in items) + len(s) * max(len(items) - 1, 0),
                  "a string (str.join)")
            args = (items, *args[1:])
        elif attr in ("format", "format_map"):
            _check_format(s, [*args, *kwargs.values()])
        elif attr == "translate" and args and isinstance(args[0], Mapping):
            longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
            _over(len(s) * max(longest, 1), "a string (str.translate)")
        out = method(*args, **kwargs)
        return out if not isinstance(out, (str, list, tuple)) else (_over(len(out), "a value") or out)
    return checked


_STR_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "format",
                          "format_map", "translate"})


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.compiler
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # `{% generation %}...{% endgeneration %}` renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
            raise InputError(f"the chat template's tojson indent {indent!r} is above 64")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Capped(jinja2.compiler.CodeGenerator):  # every `a ~ b` result goes through `environment.capped`
        def visit_Concat(self, node, frame):
            self.write("environment.capped(")
            super().visit_Concat(node, frame)
            self.write(")")

        def visit_For(self, node, frame):  # a loop's iterable goes through `environment.counted` (a step per item)
            it = node.iter
            if not (isinstance(it, jinja2.nodes.Call) and isinstance(it.node, jinja2.nodes.EnvironmentAttribute)
                    and it.node.name == "counted"):
                node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("counted"), [it], [], None, None,
                                              lineno=it.lineno)
            super().visit_For(node, frame)

    class Environment(ImmutableSandboxedEnvironment):
        """The sandbox, with strings and lists built by `*`, `+`, `~`, `%`, string-building filters and string
        methods capped at MAX_CHAT_CHARS (checked before they are built), and loops, filters and calls charged
        to the render's budget (MAX_CHAT_STEPS, MAX_CHAT_SECONDS)."""

        code_generator_class = Capped
        intercepted_binops = frozenset({"*", "+", "**", "%"})

        @staticmethod
        def capped(value, size=None):
            size = len(value) if size is None and isinstance(value, (str, list, tuple)) else size or 0
            _over(size, "a value")
            return value

        @staticmethod
        def counted(iterable):
            for i, x in enumerate(iterable):
                if i % 64 == 0:
                    _spend(64)
                yield x

        def call_binop(self, context, operator, left, right):
            _spend()
            if operator == "*":  # check the size before the repetition allocates it
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    self.capped(None, len(seq) * times)
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise InputError(f"the chat template computes a power with exponent {right}")
            if operator == "%" and isinstance(left, str):
                _check_format(left, right)
            return self.capped(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805
            _spend()
            return __self.capped(super().call(__context, __obj, *args, **kwargs))

        def getattr(self, obj, attribute):
            value = super().getattr(obj, attribute)
            return _str_method(obj, attribute, value) if isinstance(obj, str) and attribute in _STR_METHODS else value

        def getitem(self, obj, argument):
            value = super().getitem(obj, argument)
            if isinstance(obj, str) and isinstance(argument, str) and argument in _STR_METHODS:
                return _str_method(obj, argument, value)
            return value

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    for name, fn in list(env.filters.items()):
        env.filters[name] = _checked_filter(name, fn)
    env.globals["raise_exception"] = raise_exception
    lipsum = env.globals["lipsum"]

    def capped_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's argument names)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, min, max)):
            raise InputError(f"lipsum(n={n!r}, min={min!r}, max={max!r}) takes integers")
        _over(n * max * 16, "lorem ipsum (lipsum)")  # words are at most ~15 characters
        return lipsum(n, html, min, max)

    env.globals["lipsum"] = capped_lipsum
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _checked_filter(name: str, fn):
    """A jinja2 filter charged one step, with the sizes it would build checked first (join, center, indent,
    replace, format, wordwrap, batch, slice) and its result capped at MAX_CHAT_CHARS."""
    pass_arg = getattr(fn, "jinja_pass_arg", None)

    def checked(*args, **kwargs):
        _spend()
        a = args[1:] if pass_arg is not None else args  # the value, then the filter's arguments
        value, rest = (a[0], a[1:]) if a else (None, ())
        opt = lambda i, key, default=None: rest[i] if len(rest) > i else kwargs.get(key, default)  # noqa: E731
        if name == "join":
            items = _materialise(value, "a joined list")
            sep = opt(0, "d", "")
            _over(sum(len(x) if isinstance(x, str) else 0 for x in items) + len(str(sep)) * max(len(items) - 1, 0),
                  "a string (join)")
            args = (*args[: len(args) - len(a)], items, *rest)
        elif name == "center" and isinstance(opt(0, "width", 80), int):
            _over(opt(0, "width", 80), "a string (center)")
        elif name == "indent" and isinstance(value, str):
            width = opt(0, "width", 4)
            w = width if isinstance(width, int) else len(str(width))
            _over(len(value) + (value.count("\n") + 1) * max(w, 0), "a string (indent)")
        elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
            old, new, count = str(rest[0]), str(rest[1]), opt(2, "count")
            k = len(value) + 1 if old == "" else value.count(old)
            k = min(k, count) if isinstance(count, int) and count >= 0 else k
            _over(len(value) + k * (len(new) - len(old)), "a string (replace)")
        elif name == "format" and isinstance(value, str):
            _check_format(value, [*rest, *kwargs.values()])
        elif name == "wordwrap" and isinstance(value, str):
            width, wrap = opt(0, "width", 79), opt(2, "wrapstring", "\n")
            lines = len(value) // max(width if isinstance(width, int) else 1, 1) + 1
            _over(len(value) + lines * len(str(wrap or "\n")), "a string (wordwrap)")
        elif name in ("batch", "slice") and isinstance(opt(0, "linecount" if name == "batch" else "slices"), int):
            _over(opt(0, "linecount" if name == "batch" else "slices"), f"a list ({name})")
        out = fn(*args, **kwargs)
        if isinstance(out, (str, list, tuple)):
            _over(len(out), f"a value (filter {name})")
        return out

    if pass_arg is not None:
        checked.jinja_pass_arg = pass_arg
    return checked


# ---------------------------------------------------------------- GGUF


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _generate_merges(vocab: Mapping[str, int], scores: Mapping[str, int | float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary, best score first (transformers' `generate_merges`)."""
    merges = []
    for piece, score in scores.items():
        splits = ((piece[:i], piece[i:]) for i in range(1, len(piece)))
        local = [(a, b, score) for a, b in splits if a in vocab and b in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _file_merges(meta: Mapping[str, Any]) -> list[tuple[str, ...]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    return None if merges is None else [tuple(m.split(" ")) for m in merges]


def _byte_level(meta: Mapping[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    merges = _file_merges(meta)
    if merges is None:
        raise ModelFileError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    tok = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sp_decoder(strip_prefix: bool):
    seq = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    return decoders.Sequence(seq + ([decoders.Strip(content=" ", left=1)] if strip_prefix else []))


def _llama(meta: Mapping[str, Any], tokens: list[str], layout: str) -> tokenizers.Tokenizer:
    """SentencePiece vocabularies as BPE with byte fallback, in the layout transformers picks for them."""
    gemma = layout in ("gemma", "gemma4")
    if layout == "gemma":
        # Multi-space tokens are stored as real spaces; merge order is file order, not score.
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(meta)
    if merges is None:
        merges = _generate_merges(vocab, scores)
    if gemma:
        tok = tokenizers.Tokenizer(
            BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
        )
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = _sp_decoder(strip_prefix=False)
        return tok
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    if layout == "phi3":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = _sp_decoder(strip_prefix=True)
        return tok
    # transformers always prepends "▁" to the first word here; llama.cpp follows add_space_prefix, so do we.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    tok.decoder = _sp_decoder(strip_prefix=prefix)
    return tok


def _meta_id(meta: Mapping[str, Any], name: str, n_tokens: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    if value is None:
        return None
    if not 0 <= int(value) < n_tokens:
        raise ModelFileError(f"tokenizer.ggml.{name}_token_id={value} is outside the vocabulary of {n_tokens}")
    return int(value)


def _stop_ids(backend: tokenizers.Tokenizer, eos_ids: Sequence[int | None]) -> tuple[int, ...]:
    ids = [i for i in eos_ids if i is not None]
    ids += [i for t in END_OF_TURN_TOKENS if (i := backend.token_to_id(t)) is not None]
    return tuple(dict.fromkeys(ids))


def from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes, from `read_metadata`'s dict."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelFileError("GGUF metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    tokens = list(tokens)
    architecture = meta.get("general.architecture", "")
    if kind == "gpt2":
        backend = _byte_level(meta, tokens)
    elif kind in ("llama", "gemma4"):
        layout = {"gemma2": "gemma", "gemma3": "gemma"}.get(architecture, architecture)
        backend = _llama(meta, tokens, "gemma4" if kind == "gemma4" else layout)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )
    n = len(tokens)
    bos, eos, unk, pad = (_meta_id(meta, k, n) for k in ("bos", "eos", "unknown", "padding"))

    # Control tokens are special and matched whole; in a byte-level vocabulary one spelled outside the byte
    # alphabet is a llama.cpp mislabel and is skipped, as transformers does.
    types = list(meta.get("tokenizer.ggml.token_type") or ())
    alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
    special = [t for t, ty in zip(tokens, types) if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    named = [tokens[i] for i in (bos, eos, unk, pad) if i is not None]
    if architecture.startswith("gemma") and "<mask>" in tokens:
        named.append("<mask>")
    special += [t for t in dict.fromkeys(named) if t not in set(special)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    vocab = backend.get_vocab()
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(add_bos) if add_bos is not None else kind == "llama"
    if kind == "gemma4":
        add_bos = False  # its chat template writes <bos> itself
    add_bos = add_bos and bos is not None
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1",
            special_tokens=[(tokens[bos], bos)],
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    return Tokenizer(
        backend=backend, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else (eos if eos is not None else 0),
        add_bos=add_bos, chat_template=meta.get("tokenizer.chat_template") or None, stop_ids=_stop_ids(backend, [eos]),
        unk_id=unk,
    )


def from_gguf(path: str | Path) -> Tokenizer:
    """Read a GGUF file's metadata and build its tokenizer."""
    from models.gguf_file import open_gguf, read_metadata

    return from_gguf_metadata(read_metadata(open_gguf(path)))


# ---------------------------------------------------------------- Hugging Face directory


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"cannot read {path}: {e}") from e


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(path: Path, config: dict) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    return template or None


def from_hf_dir(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` and the special tokens / chat template from a Hugging Face model directory."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ModelFileError(f"{path} has no tokenizer.json (only fast-tokenizer directories are supported)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:
        raise ModelFileError(f"{path / 'tokenizer.json'} could not be loaded: {e}") from e
    config = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
    generation = _read_json(path / "generation_config.json")

    def token_id(name: str) -> int | None:
        text = _token_text(config.get(f"{name}_token"))
        return backend.token_to_id(text) if text is not None else None

    gen_eos = generation.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or ())
    bos = token_id("bos")
    if bos is None and isinstance(generation.get("bos_token_id"), int):
        bos = generation["bos_token_id"]
    eos = token_id("eos")
    if eos is None and gen_eos:
        eos = gen_eos[0]
    pad = token_id("pad")
    if pad is None and isinstance(generation.get("pad_token_id"), int):
        pad = generation["pad_token_id"]

    add_bos = config.get("add_bos_token")
    if add_bos is None:  # ask the file's post-processor whether it puts BOS first
        with_special = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and with_special[:1] == [bos] != backend.encode("a", add_special_tokens=False).ids[:1]
    return Tokenizer(
        backend=backend, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else (eos if eos is not None else 0),
        add_bos=bool(add_bos) and bos is not None, chat_template=_chat_template(path, config),
        stop_ids=_stop_ids(backend, [eos, *gen_eos]), unk_id=token_id("unk"),
    )
