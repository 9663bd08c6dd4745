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


def test_readme_more_layers_example_runs():
    """The 'More layers and networks' example runs as written (the GPU one only compiles)."""
    blocks = _blocks("python")
    more = next(b for b in blocks if "scn.Residual" in b)
    ns = {}
    exec(compile(more, "README more-layers example", "exec"), ns)
    assert ns["z"].channels == 6 and ns["logits"].shape == (2, 10)
    gpu = next(b for b in blocks if 'to("cuda")' in b)
    compile(gpu, "README GPU example", "exec")
