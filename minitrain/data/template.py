"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them, and traced.

The engine (`build_environment`): Jinja's `ImmutableSandboxedEnvironment`, the sandbox transformers renders
in, with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension (`{% break %}`, `{% continue %}`),
the `{% generation %}...{% endgeneration %}` tag (transformers' assistant-mask tag: its body, unchanged),
transformers' `tojson` filter (json.dumps, non-ASCII kept) and its two globals, `raise_exception` (a
TemplateError) and `strftime_now`. `chat.ChatEncoder` compiles its template here and renders it.

The fast paths. Renders are most of tokenize's CPU, and the stock sandbox decides every attribute access
(`content.split`, `loop.last`, `ns.index`) anew through a dozen isinstance checks. For the plain types that
JSON records and loops hold, the verdict depends only on (type, name): it is asked of the sandbox once and
remembered. `message.role` on a dict that has the key compiles to the lookup itself, and so do `loop.index0`
(Jinja's loop attributes) and `ns.last_query_index` (a namespace's attribute, names without `_`), which the
sandbox allows whatever their value; builtin methods and `namespace(...)` are called directly. Each path
gives what the sandbox gives - the same value, and the same refusal where the sandbox refuses, since every
remembered verdict is the sandbox's own answer - so a template renders (or fails) exactly as in
transformers; tests/data/test_template.py holds the verdicts to Jinja's.

Tracing (for the masks of chat.py, which must know where each message's content lands in the text). A
content passed as a `Traced` string is equal to it in value, so the render is the render. `+` carries its
(offset, message index) spans into the result, and Jinja outputs `str(expression)`, which is the `Traced`
itself, so each output piece says which contents it holds and where. Every other way of making text out of
it sets the shared `lost[0]` as it happens: a str method that makes text (`strip`, a slice, `format`:
_TEXT_MAKERS), `%`, `tojson`, a call that takes it while `environment.tracing` is set (`sep.join(...)`,
`text.replace(x, content)`). What copies text in C out of the sandbox's sight (`~`, the `join`, `replace` or
`format` filters, macros, call and filter blocks, block sets, includes) cannot be flagged: `traceable` refuses
such a template up front, from its syntax tree. The contract: the positions are right when the template is
`traceable`, `lost[0]` stayed False and every traced content reached the output; otherwise the caller locates
the contents another way (chat.py's marked render).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

# Filters that build text from their input only through its own str methods (which Traced flags), return
# it unchanged, or build no text from it; `join`, `replace`, `format`, `e`, `map` (any filter by name) ... can
# copy a content in C code, past the trace: a template using a filter outside this set is never traced.
_TRACEABLE_FILTERS = frozenset(
    {
        "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "first", "float",
        "groupby", "int", "items", "last", "length", "list", "lower", "max", "min", "reject", "rejectattr",
        "reverse", "round", "select", "selectattr", "slice", "sort", "string", "sum", "tojson", "trim",
        "truncate", "unique", "upper", "wordcount",
    }
)  # fmt: skip
# Statements whose output Jinja joins in C before it is written (macros, call/filter blocks, block sets), and
# `~`, which joins in C too: a template with one is never traced.
_UNTRACEABLE_NODES = (
    "Concat", "Macro", "CallBlock", "FilterBlock", "AssignBlock", "Include", "Import", "FromImport",
    "Extends", "Block",
)  # fmt: skip
# str methods that make text out of a string (not only inspect it): a traced content that meets one is lost.
_TEXT_MAKERS = (
    "__format__", "__getitem__", "__iter__", "__mod__", "__mul__", "__repr__", "__rmod__", "__rmul__",
    "capitalize", "casefold", "center", "encode", "expandtabs", "format", "format_map", "join", "ljust",
    "lower", "lstrip", "partition", "removeprefix", "removesuffix", "replace", "rjust", "rpartition",
    "rsplit", "rstrip", "split", "splitlines", "strip", "swapcase", "title", "translate", "upper", "zfill",
    "__getnewargs__",
)  # fmt: skip


class Traced(str):
    """A message content that knows where its characters go, for `ChatEncoder._traced_render`.

    Equal to the content in value (every test, comparison and method answers as the plain string does), so
    a render with traced contents is the render. `+` keeps track: `spans` holds (offset, message index) of
    each traced content inside the string. Any other way of making text out of it (a slice, `strip`,
    `%`, `format`, `tojson`, ...) sets `lost[0]`, and the render's positions are then not used.
    """

    spans: tuple[tuple[int, int], ...]
    lost: list[bool]

    def __add__(self, other: Any) -> Any:
        if not isinstance(other, str):
            return NotImplemented
        out = Traced(str.__add__(self, other))
        out.lost = self.lost
        out.spans = self.spans
        if type(other) is Traced:
            out.spans += tuple((at + len(self), j) for at, j in other.spans)
        return out

    def __radd__(self, other: Any) -> Any:
        if not isinstance(other, str):
            return NotImplemented
        out = Traced(str.__add__(other, self))
        out.lost = self.lost
        out.spans = tuple((at + len(other), j) for at, j in self.spans)
        return out

    def __str__(self) -> str:
        return self  # Jinja outputs `str(expression)`: the trace goes with it


def _lose(name: str) -> Any:
    method = getattr(str, name)

    def lose(self: Traced, *args: Any, **kwargs: Any) -> Any:
        self.lost[0] = True
        return method(self, *args, **kwargs)

    return lose


for _name in _TEXT_MAKERS:
    setattr(Traced, _name, _lose(_name))


def _flag_traced(value: Any) -> None:
    """Mark the traces inside `value` lost (it is about to be made into text by C code: json, `%`)."""
    if type(value) is Traced:
        value.lost[0] = True
    elif isinstance(value, dict):
        for item in value.values():
            _flag_traced(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _flag_traced(item)


def traceable(ast: Any) -> bool:
    """True when a parsed template uses only _TRACEABLE_FILTERS and none of _UNTRACEABLE_NODES (every copy of
    a traced content it can make is then flagged as it happens)."""
    import jinja2.nodes

    return all(node.name in _TRACEABLE_FILTERS for node in ast.find_all(jinja2.nodes.Filter)) and not any(
        ast.find(getattr(jinja2.nodes, name)) for name in _UNTRACEABLE_NODES
    )


def names_read(ast: Any) -> frozenset[str]:
    """The names a parsed template reads from its render's context (Jinja's own analysis): a name passed to
    the render that is not among them cannot change the text (a sandboxed template has no other way to
    reach its context)."""
    import jinja2.meta

    return frozenset(jinja2.meta.find_undeclared_variables(ast))


def names_set(ast: Any) -> frozenset[str]:
    """The names a parsed template assigns itself (`{% set content = ... %}`, loop variables)."""
    import jinja2.nodes

    return frozenset(node.name for node in ast.find_all(jinja2.nodes.Name) if node.ctx == "store")


def build_environment() -> Any:
    """A Jinja environment that renders like transformers' `apply_chat_template` (sandboxed, same filters)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body
        # unchanged.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        _flag_traced((x, indent, separators))  # json copies strings in C
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    from jinja2.runtime import LoopContext
    from jinja2.utils import Namespace

    # Exact types whose attributes' safety depends on (type, name) alone: what JSON records and loops hold.
    plain_types = frozenset(
        {str, Traced, dict, list, tuple, int, float, bool, type(None), LoopContext, Namespace}
    )
    dict_attributes = frozenset(dir({}))
    loop_attributes = frozenset(
        {"index0", "index", "revindex0", "revindex", "first", "last", "length", "depth", "depth0",
         "previtem", "nextitem"}
    )  # fmt: skip
    builtin_method = type("".split)

    from jinja2.compiler import CodeGenerator, optimizeconst

    class Generator(CodeGenerator):
        """`message.role` on a dict that has the key compiles to the lookup itself (what Sandbox.getattr
        returns for it, less a Python call: ~40 per render), as do a loop's attributes (`loop.index0`, ...)
        and a namespace's (`ns.index`, held in its attribute dict): the sandbox allows both whatever the
        value, so its answer is the value itself. Anything else goes to Sandbox.getattr."""

        @optimizeconst
        def visit_Getattr(self, node: Any, frame: Any) -> None:
            if self.environment.is_async or node.attr in dict_attributes:
                return CodeGenerator.visit_Getattr.__wrapped__(self, node, frame)
            key = repr(node.attr)
            self.write(f"(_mt_obj[{key}] if (_mt_type := type(_mt_obj := ")
            self.visit(node.node, frame)
            self.write(f")) is dict and {key} in _mt_obj else ")
            if node.attr in loop_attributes:
                self.write(f"_mt_obj.{node.attr} if _mt_type is LoopContext else ")
            if not node.attr.startswith("_"):
                self.write(
                    f"_mt_attrs[{key}] if _mt_type is Namespace and {key} in "
                    "(_mt_attrs := object.__getattribute__(_mt_obj, '_Namespace__attrs')) else "
                )
            self.write(f"environment.getattr(_mt_obj, {key}))")

    class Sandbox(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with the same verdicts found faster (renders are most of tokenize's CPU).

        The sandbox decides every attribute access (`content.split`, `loop.last`, `ns.index`) anew through
        a dozen isinstance checks; for the plain types above the verdict depends only on (type, name), so
        it is computed once by the sandbox itself and remembered. `message.role` on a dict looks the key up
        directly when dict has no such attribute (the sandbox tries the attribute first and then the key:
        the same value, without the AttributeError).
        """

        intercepted_binops = frozenset({"%"})  # `fmt % (content,)`: C code makes the text (see Traced)
        code_generator_class = Generator

        def compile(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().compile(*args, **kwargs)
            except SyntaxError:  # a `:=` where Python refuses one (none known): the stock code generator
                self.code_generator_class = CodeGenerator
                return super().compile(*args, **kwargs)

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.verdicts: dict[tuple[type, str], bool] = {}
            self.tracing = False  # True during ChatEncoder._traced_render

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _flag_traced(right)
            return super().call_binop(context, operator, left, right)

        def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
            key = (type(obj), attr)
            verdict = self.verdicts.get(key)
            if verdict is None:
                verdict = super().is_safe_attribute(obj, attr, value)
                if key[0] in plain_types:
                    self.verdicts[key] = verdict
            return verdict

        def getattr(self, obj: Any, attribute: str) -> Any:
            kind = type(obj)
            if kind is dict and attribute not in dict_attributes:  # a missing key: asked, not raised
                return obj[attribute] if attribute in obj else self.undefined(obj=obj, name=attribute)
            # A remembered verdict: the sandbox's own path, less its checks (str.format is left to it).
            verdict = self.verdicts.get((kind, attribute))
            if verdict and kind is Namespace:  # `ns.index`: its attribute dict, read without two calls
                attrs = object.__getattribute__(obj, "_Namespace__attrs")
                if attribute in attrs:
                    return attrs[attribute]
            if verdict is not None and attribute not in ("format", "format_map"):
                try:
                    value = getattr(obj, attribute)
                except AttributeError:
                    return super().getattr(obj, attribute)
                return value if verdict else self.unsafe_undefined(obj, attribute)
            return super().getattr(obj, attribute)

        def wrap_str_format(self, value: Any) -> Any:
            owner = getattr(value, "__self__", None)
            if type(owner) is Traced and getattr(value, "__name__", "") in ("format", "format_map"):
                owner.lost[0] = True  # `content.format(...)`: formatted in C, past the override
            return super().wrap_str_format(value)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            if __self.tracing:  # `sep.join(...)`, `text.replace(x, content)`: C code copies a traced argument
                for value in args:
                    if type(value) is not str:
                        _flag_traced(value)
                for key, value in kwargs.items():
                    if type(value) is not str and key != "_loop_vars" and key != "_block_vars":
                        _flag_traced(value)
            # A builtin method (`content.split`, `messages.items`) is safely callable and takes no context:
            # the sandbox's and the context's checks both pass it straight through; done here directly.
            # `namespace(...)` (Jinja's Namespace class, once per render): safe, takes no context either.
            if type(__obj) is not builtin_method and __obj is not Namespace:
                return super().call(__context, __obj, *args, **kwargs)
            kwargs.pop("_block_vars", None)
            kwargs.pop("_loop_vars", None)
            try:
                return __obj(*args, **kwargs)
            except StopIteration:
                return __self.undefined(
                    "value was undefined because a callable raised a StopIteration exception"
                )

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
