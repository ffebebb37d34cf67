"""Ollama: the GGUF plus a Modelfile whose TEMPLATE (Go text/template) renders the model's chat template.

The jinja chat template is not translated by parsing it. It is rendered with marker messages, and
the text around the markers gives each role's prefix and suffix, where the system message goes
(its own turn, or folded into the first or last user turn), the generation prompt, a default
system turn and the BOS text. From those pieces one Go template is written, and the same pieces
render in Python (`TemplateSpec.render`), which is checked against the jinja output on several
conversations before anything is written. This covers ChatML, Llama 3, Gemma, Mistral [INST],
Phi-3 and other role-wrapped formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

S1, U1, A1, U2, A2, U3 = "SYSMARK1", "USERMARK1", "ASSTMARK1", "USERMARK2", "ASSTMARK2", "USERMARK3"


class TemplateError(ValueError):
    pass


@dataclass
class TemplateSpec:
    """A role-wrapped chat format: every message renders as prefix + content + suffix."""

    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    system_prefix: str = ""
    system_suffix: str = ""
    system_mode: str = "own"  # own (a turn of its own) | first_user | last_user (folded into that user turn)
    system_separator: str = ""  # between system and user text when folded
    default_system: str | None = None  # text of the system turn the template adds when none is given
    bos: str = ""  # BOS text the jinja template writes
    bos_in_template: bool = False  # write it in the Go template too (when the tokenizer does not add BOS itself)
    style: str = "generic"
    stops: list[str] = field(default_factory=list)

    # ---- Python rendering with the Go template's semantics (used to check the translation)
    def render(self, messages: list[dict[str, str]], include_bos: bool = True) -> str:
        out = [self.bos if include_bos else ""]
        sys_text = None
        msgs = list(messages)
        if msgs and msgs[0]["role"] == "system":
            sys_text = msgs[0]["content"]
        elif self.default_system is not None:
            sys_text = self.default_system
            if self.system_mode == "own":
                out.append(self.system_prefix + self.default_system + self.system_suffix)
                sys_text = None
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
        first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), -1)
        for i, m in enumerate(msgs):
            last = i == len(msgs) - 1
            role, content = m["role"], m["content"]
            if role == "system":
                if self.system_mode == "own":
                    out.append(self.system_prefix + content + self.system_suffix)
                continue
            if role == "user":
                fold = (self.system_mode == "first_user" and i == first_user) or (
                    self.system_mode == "last_user" and i == last_user)
                text = (sys_text + self.system_separator + content) if (fold and sys_text) else content
                out.append(self.user_prefix + text + self.user_suffix)
            elif role == "assistant":
                out.append(self.assistant_prefix + content + ("" if last else self.assistant_suffix))
            if last and role != "assistant":
                out.append(self.generation_prompt)
        return "".join(out)

    # ---- the Go template
    def go_template(self) -> str:
        g = _go_text
        parts = [g(self.bos)] if self.bos_in_template else []
        if self.system_mode == "own":
            if self.default_system is not None:
                parts.append('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                             f"{g(self.system_prefix + self.default_system + self.system_suffix)}{{{{ end }}}}")
            system_branch = f'{{{{ if eq .Role "system" }}}}{g(self.system_prefix)}{{{{ .Content }}}}{g(self.system_suffix)}'
            user_text = "{{ .Content }}"
        else:
            default = _go_string(self.default_system) if self.default_system is not None else '""'
            parts.append(f"{{{{ $sys := {default} }}}}")
            pick = "$lastUser" if self.system_mode == "last_user" else "$firstUser"
            parts.append('{{ $firstUser := -1 }}{{ $lastUser := -1 }}{{ range $i, $m := .Messages }}'
                         '{{ if eq $m.Role "user" }}{{ if lt $firstUser 0 }}{{ $firstUser = $i }}{{ end }}'
                         "{{ $lastUser = $i }}{{ end }}{{ end }}")
            system_branch = '{{ if eq .Role "system" }}{{ $sys = .Content }}'
            user_text = (f"{{{{ if and $sys (eq $i {pick}) }}}}{{{{ $sys }}}}{g(self.system_separator)}{{{{ end }}}}"
                         "{{ .Content }}")
        parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
        parts.append(system_branch)
        parts.append(f'{{{{ else if eq .Role "user" }}}}{g(self.user_prefix)}{user_text}{g(self.user_suffix)}')
        parts.append(f'{{{{ else if eq .Role "assistant" }}}}{g(self.assistant_prefix)}{{{{ .Content }}}}'
                     f"{{{{ if not $last }}}}{g(self.assistant_suffix)}{{{{ end }}}}")
        parts.append("{{ end }}")
        parts.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{g(self.generation_prompt)}{{{{ end }}}}')
        parts.append("{{ end }}")
        return "".join(parts)


def _go_text(s: str) -> str:
    """Literal text inside a Go template; `{{` cannot appear raw."""
    return s.replace("{{", '{{ "{{" }}')


def _go_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Go interpreted string literal


# ------------------------------------------------------------------ derivation from the jinja template
def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


_CHECKS = [
    [{"role": "user", "content": U1}],
    [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}],
    [{"role": "system", "content": S1}, {"role": "user", "content": U1}],
    [{"role": "system", "content": S1}, {"role": "user", "content": U1}, {"role": "assistant", "content": A1},
     {"role": "user", "content": U2}, {"role": "assistant", "content": A2}, {"role": "user", "content": U3}],
]


def derive_spec(tokenizer: Any) -> TemplateSpec:
    """Read the chat format off the rendered jinja template (see the module doc).

    The text between two markers is a suffix of one turn plus the prefix of the next; where one ends
    and the other begins is searched, and the first split whose pieces reproduce every check
    conversation exactly is taken (preferring the split the template's own endings suggest).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template")
    u = [{"role": "user", "content": U1}]
    ua = u + [{"role": "assistant", "content": A1}]
    uau = ua + [{"role": "user", "content": U2}]
    try:
        r_u, r_ug = _render(tokenizer, u, False), _render(tokenizer, u, True)
        r_ua, r_uau = _render(tokenizer, ua, False), _render(tokenizer, uau, True)
    except Exception as e:
        raise TemplateError(f"rendering the chat template failed: {e}") from e
    for m in (U1, A1, U2):
        if m not in r_uau:
            raise TemplateError("the chat template does not write the message contents as given")
    wants = []
    for conv in _CHECKS:
        try:
            wants.append((conv, _render(tokenizer, conv, True)))
        except Exception:
            pass  # e.g. a template that refuses system messages
    sys_render = _system_render(tokenizer)
    head_u = r_ug[: r_ug.index(U1)]  # bos + default system turn + user prefix
    g_tail = r_ug[r_ug.index(U1) + len(U1):]  # user suffix + generation prompt
    t_end = r_u[r_u.index(U1) + len(U1):] if U1 in r_u else ""  # user suffix (+ whatever ends a transcript)
    mid = _between(r_uau, U1, A1)  # user suffix + assistant prefix
    after_a = _between(r_uau, A1, U2)  # assistant suffix + user prefix
    t_a = r_ua[r_ua.index(A1) + len(A1):] if A1 in r_ua else ""  # assistant suffix (+ transcript end)
    bos = getattr(tokenizer, "bos_token", None) or ""
    eos = getattr(tokenizer, "eos_token", None) or ""
    if eos:  # a transcript that is not waiting for a reply may end with EOS: not part of the turn
        t_end = t_end.removesuffix(eos)
        t_a = t_a.removesuffix(eos)
    last_error = "no split of the turns reproduces the template"
    for su in _prefix_candidates(g_tail, t_end):
        if not mid.startswith(su):
            continue
        for pu in _suffix_candidates(after_a, t_a):
            if not head_u.endswith(pu):
                continue
            lead_all = head_u[: len(head_u) - len(pu)]
            for bos_text in ("", bos) if bos else ("",):
                if not lead_all.startswith(bos_text):
                    continue
                spec = TemplateSpec(user_prefix=pu, user_suffix=su, assistant_prefix=mid[len(su):],
                                    assistant_suffix=after_a[: len(after_a) - len(pu)],
                                    generation_prompt=g_tail[len(su):], bos=bos_text)
                try:
                    _derive_system(spec, sys_render, lead_all[len(bos_text):])
                    _check(spec, wants)
                except TemplateError as e:
                    last_error = str(e)
                    continue
                spec.style = _style_name(spec)
                return spec
    raise TemplateError(f"could not translate the chat template: {last_error}")


def _between(text: str, a: str, b: str) -> str:
    i = text.index(a) + len(a)
    return text[i : text.index(b, i)]


def _prefix_candidates(text: str, hint: str) -> list[str]:
    """Prefixes of `text`, the one equal to `hint` first, then longest first."""
    out = [text[:n] for n in range(len(text), -1, -1)]
    if hint and text.startswith(hint):
        out.remove(hint)
        out.insert(0, hint)
    return out


def _suffix_candidates(text: str, head_hint: str) -> list[str]:
    """Suffixes of `text` (a user prefix), preferring the split whose head equals `head_hint` (the turn's
    own ending), then the longest suffix."""
    out = [text[len(text) - n:] for n in range(len(text), -1, -1)]
    if head_hint and text.startswith(head_hint):
        best = text[len(head_hint):]
        out.remove(best)
        out.insert(0, best)
    return out


def _system_render(tokenizer: Any) -> str | None:
    msgs = [{"role": "system", "content": S1}, {"role": "user", "content": U1},
            {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]
    try:
        r = _render(tokenizer, msgs, True)
    except Exception:
        return None  # the template refuses system messages
    return r if S1 in r else None


def _derive_system(spec: TemplateSpec, r: str | None, lead: str) -> None:
    """Where the system message goes, and the default system turn (`lead`: text before the first user turn
    when no system message is given)."""
    if r is None:  # refused or dropped: fold it into the first user turn, the common convention
        spec.system_mode, spec.system_separator = "first_user", "\n\n"
    else:
        if spec.bos:
            if not r.startswith(spec.bos):
                raise TemplateError("BOS is not written with a system message")
            r = r[len(spec.bos):]
        i_s, i_u1, i_u2 = r.index(S1), r.index(U1), r.index(U2)
        if i_s < i_u1:
            before, between = r[:i_s], r[i_s + len(S1): i_u1]
            if before == spec.user_prefix:
                spec.system_mode, spec.system_separator = "first_user", between
            elif between.endswith(spec.user_prefix):
                spec.system_mode, spec.system_prefix = "own", before
                spec.system_suffix = between[: len(between) - len(spec.user_prefix)]
            else:
                raise TemplateError("could not separate the system turn from the user turn after it")
        elif i_s < i_u2 and r[:i_s].endswith(spec.user_prefix):
            spec.system_mode, spec.system_separator = "last_user", r[i_s + len(S1): i_u2]
        else:
            raise TemplateError("the system message is placed where no rule here puts it")
    if lead:  # a system turn the template writes when none is given
        if spec.system_mode == "own" and lead.startswith(spec.system_prefix) and lead.endswith(spec.system_suffix) \
                and len(lead) >= len(spec.system_prefix) + len(spec.system_suffix):
            spec.default_system = lead[len(spec.system_prefix): len(lead) - len(spec.system_suffix)]
        else:
            raise TemplateError(f"unexplained text before the first user turn: {lead[:60]!r}")


def _style_name(spec: TemplateSpec) -> str:
    text = spec.user_prefix + spec.assistant_prefix + spec.generation_prompt
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"),
                         ("<start_of_turn>", "gemma"), ("[INST]", "mistral"), ("<|user|>", "phi3")):
        if marker in text:
            return name
    return "generic"


def _check(spec: TemplateSpec, wants: list[tuple[list[dict[str, str]], str]]) -> None:
    """The pieces must reproduce the jinja output for conversations that end waiting for the assistant."""
    for conv, want in wants:
        got = spec.render(conv)
        if got != want:
            raise TemplateError(f"translation check failed for {[m['role'] for m in conv]}:\n"
                                f"  jinja: {want!r}\n  ours:  {got!r}")


# ------------------------------------------------------------------ Modelfile
def stop_strings(tokenizer: Any, spec: TemplateSpec | None) -> list[str]:
    from ..generate.stops import stop_token_ids

    out = []
    for tid in stop_token_ids(tokenizer):
        tok = tokenizer.convert_ids_to_tokens(tid)
        if tok and tok not in out:
            if spec is None or tok in spec.assistant_suffix or tok in spec.user_prefix or tok == tokenizer.eos_token:
                out.append(tok)
    return out


def modelfile(gguf_name: str, tokenizer: Any, params: dict[str, Any] | None = None) -> tuple[str, TemplateSpec | None]:
    """The Modelfile text (FROM, TEMPLATE, PARAMETER stop ...) and the spec it was made from (None when the
    tokenizer has no chat template: then the model runs as a plain completion model)."""
    lines = [f"FROM ./{gguf_name}", ""]
    spec = None
    if getattr(tokenizer, "chat_template", None):
        from .gguf_vocab import _adds_bos

        spec = derive_spec(tokenizer)
        spec.bos_in_template = bool(spec.bos) and not _adds_bos(tokenizer)
        template = spec.go_template()
        if '"""' in template:
            raise TemplateError('the chat template contains """, which a Modelfile cannot quote')
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""', ""]
    for s in stop_strings(tokenizer, spec):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    for k, v in (params or {}).items():
        lines.append(f"PARAMETER {k} {v}")
    return "\n".join(lines) + "\n", spec


def write_ollama(gguf_path: Path, tokenizer: Any, out_dir: Path, params: dict[str, Any] | None = None) -> Path:
    """Write out_dir/Modelfile next to the GGUF (which must already be in out_dir). Returns the Modelfile."""
    text, _ = modelfile(gguf_path.name, tokenizer, params)
    path = Path(out_dir) / "Modelfile"
    path.write_text(text)
    return path
