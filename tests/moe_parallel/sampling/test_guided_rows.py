"""The grammar masks' cost on the step path: a rank's first constrained step must not import
torch's compiler (llguidance.torch does at import, 0.8-1.6 s inside that step, with every other
sequence of the rank waiting), and the mask is the grammar's."""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import json, sys
from moe_parallel.contract import Guided
from moe_parallel.sampling.guided import GuidedRows
rows = GuidedRows(sys.argv[1], 32000, (2,), "cpu")
allowed = rows.mask([1], [Guided("choice", json.dumps(["yes", "no"]))], [[]])
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "allowed": int(allowed.sum()),
                  "shape": list(allowed.shape)}))
"""


def test_a_first_mask_imports_no_compiler_and_allows_only_the_grammar(tiny_ckpt):
    out = subprocess.run([sys.executable, "-c", CHECK, str(tiny_ckpt)], capture_output=True, text=True, timeout=120,
                         check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dynamo"] is False
    assert got["shape"] == [1, 32000]
    assert 0 < got["allowed"] < 32000  # a choice of two words allows a few first tokens, not all
