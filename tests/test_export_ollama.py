"""Ollama: the Modelfile's Go TEMPLATE renders conversations exactly as the model's jinja chat template.

The Go side runs through Go's own text/template when a Go toolchain is installed (Ollama's engine);
otherwise the Python rendering of the same pieces is checked against jinja.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tunery.export.ollama import TemplateError, derive_spec, modelfile

TEMPLATES = {
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
               "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
               "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
               "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "llama3.1": ("{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
                 "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
                 "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}"
                 "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}{{- \"Cutting Knowledge Date: December "
                 "2023\\n\" }}{{- \"Today Date: \" + date_string + \"\\n\\n\" }}{{- system_message }}{{- \"<|eot_id|>\" }}"
                 "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
                 "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
                 "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
              "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content']"
              " | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"),
    "gemma3": ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] "
               "+ '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
               "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if "
               "(message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = "
               "message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first "
               "else \"\") }}{{- message['content'] | trim }}{{- '<end_of_turn>\n' }}{%- endfor -%}{%- if "
               "add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
                "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
                "eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                "{% endfor %}"),
    "mistral-v3": ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set "
                   "loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- "
                   "bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if loop.last "
                   "and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + "
                   "'[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}{%- elif "
                   "message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}"),
    "qwen2.5": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
                "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == "
                "'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}{{- "
                "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor "
                "%}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "phi3": ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
             "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
             "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
}
STYLES = {"llama3": "llama3", "llama3.1": "llama3", "gemma": "gemma", "gemma3": "gemma", "mistral": "mistral",
          "mistral-v3": "mistral", "qwen2.5": "chatml", "phi3": "phi3"}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c\nwith {braces} and \"quotes\""}],
]

GO_MAIN = r'''package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var in struct {
		Template string
		Messages [][]Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(in.Template))
	var outs []string
	for _, msgs := range in.Messages {
		var b []byte
		w := &buf{&b}
		if err := t.Execute(w, map[string]any{"Messages": msgs}); err != nil {
			panic(err)
		}
		outs = append(outs, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}

type buf struct{ b *[]byte }

func (w *buf) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
'''


@pytest.fixture(scope="module")
def tok(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_path))


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Run Go's text/template (what Ollama uses), or None without a Go toolchain."""
    go = shutil.which("go")
    if go is None:
        return None
    d = tmp_path_factory.mktemp("gotmpl")
    (d / "main.go").write_text(GO_MAIN)
    (d / "go.mod").write_text("module gotmpl\n\ngo 1.18\n")
    subprocess.run([go, "build", "-o", str(d / "render")], cwd=d, check=True, capture_output=True)

    def render(template: str, convs: list) -> list[str]:
        msgs = [[{"Role": m["role"], "Content": m["content"]} for m in c] for c in convs]
        out = subprocess.run([str(d / "render")], input=json.dumps({"Template": template, "Messages": msgs}),
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    return render


def _jinja(tok, conv):
    try:
        return tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    except Exception:
        return None  # the template refuses this conversation (e.g. a system message)


def _check_all(tok, spec, go_render):
    convs = [c for c in CONVERSATIONS if _jinja(tok, c) is not None]
    wants = [_jinja(tok, c) for c in convs]
    template = spec.go_template()
    gots = go_render(template, convs) if go_render else [spec.render(c) for c in convs]
    for want, got in zip(wants, gots):
        if not spec.bos_in_template and spec.bos:
            want = want.removeprefix(spec.bos)  # BOS comes from the tokenizer (add_bos_token)
            got = got.removeprefix(spec.bos)
        assert got == want


def test_smollm2_chatml_with_default_system(tok, go_render):
    spec = derive_spec(tok)
    assert spec.style == "chatml" and spec.system_mode == "own"
    assert spec.default_system.startswith("You are a helpful AI assistant named SmolLM")
    _check_all(tok, spec, go_render)
    text, _ = modelfile("smol-f16.gguf", tok)
    assert text.startswith("FROM ./smol-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'TEMPLATE """' in text


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_known_formats_translate(tok, go_render, name):
    t = tok.__class__.from_pretrained(tok.name_or_path)
    t.chat_template = TEMPLATES[name]
    spec = derive_spec(t)
    assert spec.style == STYLES[name]
    _check_all(t, spec, go_render)
    expected_mode = {"gemma": "first_user", "gemma3": "first_user", "mistral": "first_user",
                     "mistral-v3": "last_user"}.get(name, "own")
    assert spec.system_mode == expected_mode


def test_go_toolchain_renders_when_available(go_render):
    if go_render is None:
        pytest.skip("no Go toolchain: the Python rendering of the same pieces was checked instead")
    assert go_render('{{ range $i, $_ := .Messages }}{{ .Role }}:{{ .Content }};{{ end }}',
                     [[{"role": "user", "content": "x"}]]) == ["user:x;"]


def test_untranslatable_template_is_an_error(tok):
    t = tok.__class__.from_pretrained(tok.name_or_path)
    t.chat_template = "{% for m in messages %}{{ m['content'] | lower }}{% endfor %}"
    with pytest.raises(TemplateError):
        derive_spec(t)


def test_export_ollama_folder(tiny_llama, tmp_path):
    import yaml

    from tunery.export import export_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(tiny_llama, target_is_directory=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": "default"}))
    out = export_run(str(run), fmt="ollama", quant="q8_0")
    assert out == run / "ollama"
    assert (out / "run-q8_0.gguf").is_file()
    text = (out / "Modelfile").read_text()
    assert "FROM ./run-q8_0.gguf" in text and "<|im_start|>assistant" in text and "PARAMETER stop" in text
