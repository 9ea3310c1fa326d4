"""Tests for minitrain/data/template.py: the sandbox's verdicts and the tracing contract, on the engine alone.

The sandbox is held to Jinja's own ImmutableSandboxedEnvironment: each access allowed or refused as it
decides, also once the verdict is remembered. Tracing: a content joined by `+` is found where it lands; each
other way of making text out of it (COPY_ROUTES) gives the trace up as it happens; a template that copies
text in C where nothing sees it (UNTRACEABLE) is refused up front by `traceable`. Renders equal to
transformers' on every fixture record, and the marked render taking over from a lost trace, are tested
through ChatEncoder in test_chat.py (they need the fixture tokenizers).
"""

from __future__ import annotations

import pytest

from minitrain.data.template import Traced, build_environment, names_read, traceable

# Each makes text out of the user's content by something other than `+`, then writes the content again
# with `+` after the user's end of turn: a trace that missed the first would put the user message after
# its own <|im_end|>, and the turn before it would be trained through the user's text.
COPY_ROUTES = {
    "str method": "m['content'].strip()",
    "slice": "m['content'][0:]",
    "percent": "'%s' % (m['content'],)",
    "format": "'{}'.format(m['content'])",
    "format of the content": "m['content'].format()",
    "join method": "''.join([m['content']])",
    "argument of a method": "'@'.replace('@', m['content'])",
    "tojson": "m['content'] | tojson",
}
# Templates that copy text in C where no trace can see it: never traced (the marked render locates).
UNTRACEABLE = {
    "tilde": "'<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n'",
    "join filter": "['<|im_start|>', m['role'], '\\n', m['content'], '<|im_end|>\\n'] | join",
    "replace filter": (
        "'<|im_start|>' + m['role'] + '\\n' + ('@' | replace('@', m['content'])) + '<|im_end|>\\n'"
    ),
}
PLUS = "'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'"  # traced all the way

TWO_EXCHANGES = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green."},
]


def chatml_with_user(expression: str) -> str:
    """ChatML whose user (and system) turns are written by the Jinja `expression`."""
    return (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ " + expression + " }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def copying_template(route: str) -> str:
    """The ChatML template of a route of COPY_ROUTES or UNTRACEABLE."""
    if route in COPY_ROUTES:
        user = (
            "'<|im_start|>' + m['role'] + '\\n' + " + COPY_ROUTES[route] + " + '<|im_end|>\\n' + "
            "m['content'] + '\\n'"
        )
    else:
        user = UNTRACEABLE[route]
    return chatml_with_user(user)


def render_traced(source: str) -> tuple[str, dict[int, list[int]], bool]:
    """TWO_EXCHANGES rendered with every content a `Traced`: (text, where each message's traces go, lost)."""
    environment = build_environment()
    lost = [False]
    messages = []
    for j, message in enumerate(TWO_EXCHANGES):
        content = Traced(message["content"])
        content.lost, content.spans = lost, ((0, j),)
        messages.append({**message, "content": content})
    environment.tracing = True
    pieces = list(environment.from_string(source).generate(messages=messages))
    landed: dict[int, list[int]] = {}
    length = 0
    for piece in pieces:
        for at, j in piece.spans if type(piece) is Traced else ():
            landed.setdefault(j, []).append(length + at)
        length += len(piece)
    return "".join(pieces), landed, lost[0]


def plain_render(source: str) -> str:
    return build_environment().from_string(source).render(messages=TWO_EXCHANGES)


# ----------------------------------------------------------------------------------- the sandbox's verdicts


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.append(1) }}{{ messages | length }}",  # mutating a list: SecurityError
        "{{ messages[0].update({'a': 1}) }}",  # mutating a dict
        "{{ messages[0].clear }}",
        "{{ messages.__class__ }}",  # internals
        "{{ ''.__class__.__mro__ }}",
        "{% for m in messages %}{{ loop.__class__ }}{{ loop.index0 }}{% endfor %}",
        "{% set ns = namespace(a=1) %}{{ ns.a }}{{ ns.__init__ }}",
        "{{ messages[0].role }}{{ messages[0].items() | list }}{{ messages[0].nope is defined }}",
        "{{ 'a{0}'.format(messages[0].role) }}{{ messages[0].content.split(' ')[0].upper() }}",
        # loop and namespace attributes, read in the compiled code itself (Generator): the sandbox's values
        "{% for m in messages * 3 %}{{ loop.index0 }}{{ loop.index }}{{ loop.revindex0 }}{{ loop.revindex }}"
        "{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.depth }}{{ loop.depth0 }}"
        "{{ loop.previtem is defined }}{{ loop.nextitem is defined }}{{ loop.cycle('a', 'b') }}"
        "{{ loop.nope is defined }}{{ loop._peek_next }}{% endfor %}",
        "{% set ns = namespace(a=1, b=none) %}{% set ns.c = messages %}{{ ns.a }}{{ ns.b }}"
        "{{ ns.c | length }}{{ ns.nope is defined }}{{ ns._Namespace__attrs }}",
        "{% set ns = {'a': 1} %}{% set loop = {'index0': 7} %}{{ ns.a }}{{ loop.index0 }}"
        "{{ ns.b is defined }}",
        "{% set ns = namespace(f='{}!'.format) %}{{ ns.f('x') }}",
    ],
)
def test_sandbox_verdicts_match_jinjas_own(source):
    """Each access is allowed or refused exactly as jinja's ImmutableSandboxedEnvironment decides, also
    the second time (when the verdict is remembered)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def outcome(env):
        messages = [{"role": "user", "content": "hello there"}]
        try:
            return env.from_string(source).render(messages=messages)
        except Exception as err:
            return type(err).__name__

    stock = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    ours = build_environment()
    assert type(ours) is not ImmutableSandboxedEnvironment
    expected = outcome(stock)
    assert outcome(ours) == expected and outcome(ours) == expected


# ------------------------------------------------------------------------------------------------ tracing


def test_contents_joined_by_plus_are_traced_to_where_they_land():
    source = chatml_with_user(PLUS)
    text, landed, lost = render_traced(source)
    assert text == plain_render(source) and type(text) is str
    assert not lost
    assert landed == {j: [text.index(m["content"])] for j, m in enumerate(TWO_EXCHANGES)}
    assert traceable(build_environment().parse(source))


@pytest.mark.parametrize("route", [*COPY_ROUTES, *UNTRACEABLE])
def test_any_copy_but_plus_gives_the_trace_up_or_the_template_is_refused(route):
    """A copy the engine sees (COPY_ROUTES) sets `lost` as it happens, in a traceable template. One it
    cannot see (UNTRACEABLE: no flag, the user's content lands nowhere) makes the template untraceable."""
    source = copying_template(route)
    text, landed, lost = render_traced(source)
    assert text == plain_render(source)
    if route in COPY_ROUTES:
        assert lost
        assert traceable(build_environment().parse(source))
    else:
        assert not lost and 2 not in landed
        assert not traceable(build_environment().parse(source))


# ------------------------------------------------------------------------------------------ names read

# Where a template can read a name passed to its render: each of these reads `flag`, so the render with
# flag=True differs from the render without it; a template that only sets `flag` itself, or never
# mentions it, renders the same whatever is passed.
READS_FLAG = {
    "if": "{% if flag %}on{% endif %}",
    "is defined": "{% if flag is defined and flag is false %}off{% endif %}",
    "inside a loop": "{% for m in messages %}{{ m['content'] }}{% if flag %}!{% endif %}{% endfor %}",
    "inside a macro": "{% macro say(x) %}{{ x }}{{ flag }}{% endmacro %}{{ say('a') }}",
    "filter argument": "{{ messages | length > 0 and flag }}",
    "set from it": "{% set mode = flag %}{{ mode }}",
    "namespace": "{% set ns = namespace(on=flag) %}{{ ns.on }}",
    "read before set": "{{ flag }}{% set flag = 'x' %}",
    "macro default": "{% macro say(x=flag) %}{{ x }}{% endmacro %}{{ say() }}",
    "call block": "{% macro box() %}[{{ caller() }}]{% endmacro %}{% call box() %}{{ flag }}{% endcall %}",
    "block set": "{% set x %}{{ flag }}{% endset %}{{ x }}",
    "generation tag": "{% generation %}{{ flag }}{% endgeneration %}",
}
IGNORES_FLAG = {
    "set first": "{% set flag = 'mine' %}{{ flag }}",
    "loop variable": "{% for flag in messages %}{{ flag['content'] }}{% endfor %}",
    "macro argument": "{% macro say(flag) %}{{ flag }}{% endmacro %}{{ say('a') }}",
    "never mentioned": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


@pytest.mark.parametrize("route", [*READS_FLAG, *IGNORES_FLAG])
def test_names_read_is_exactly_what_can_change_the_render(route):
    """`names_read` (what --chat-template-kwargs is checked against) holds a name when, and here only when,
    passing it changes the text: a name it leaves out provably renders the same."""
    source = {**READS_FLAG, **IGNORES_FLAG}[route]
    template = build_environment().from_string(source)
    messages = [{"role": "user", "content": "hi"}]
    renders = {
        template.render(messages=messages, **kwargs) for kwargs in ({}, {"flag": True}, {"flag": False})
    }
    read = "flag" in names_read(build_environment().parse(source))
    assert read == (route in READS_FLAG)
    assert (len(renders) > 1) == read, renders
