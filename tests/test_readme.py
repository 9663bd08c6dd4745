"""The README's examples stay true: the layer example runs, the training example compiles."""
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first = text.index("```")
    assert text[:first].strip() == "# sparsecnn"
    bash = _blocks("bash")
    assert "sparsecnn train" in bash[0] and "pytest" in bash[1]


def test_readme_python_examples():
    train_example, layer_example = _blocks("python")[:2]
    compile(train_example, "README training example", "exec")
    exec(compile(layer_example, "README layer example", "exec"), {})
