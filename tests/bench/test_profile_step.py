"""``bench/profile_step.py``: HLO grouping on a hand-written module, and a small traced run writing its table."""
import re

from scriptload import load_script

HLO = """HloModule m

%fused_conv (p0: f32[1,4,4,2], p1: f32[3,3,2,2]) -> f32[1,4,4,2] {
  %p0 = f32[1,4,4,2]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,2,2]{3,2,1,0} parameter(1)
  ROOT %c = f32[1,4,4,2]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_exp (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%p0)
}

%fused_copy (p0: f32[4,2]) -> f32[2,4] {
  %p0 = f32[4,2]{1,0} parameter(0)
  ROOT %t = f32[2,4]{1,0} transpose(%p0), dimensions={1,0}
}

ENTRY %main (a: f32[1,4,4,2], w: f32[3,3,2,2], v: f32[4], m: f32[4,2]) -> f32[4] {
  %a = f32[1,4,4,2]{3,2,1,0} parameter(0)
  %w = f32[3,3,2,2]{3,2,1,0} parameter(1)
  %v = f32[4]{0} parameter(2)
  %m = f32[4,2]{1,0} parameter(3)
  %conv_fusion.1 = f32[1,4,4,2]{3,2,1,0} fusion(%a, %w), kind=kCustom, calls=%fused_conv
  %exp_fusion.2 = f32[4]{0} fusion(%v), kind=kLoop, calls=%fused_exp
  %copy_fusion.3 = f32[2,4]{1,0} fusion(%m), kind=kLoop, calls=%fused_copy
  %dot.4 = f32[4,4]{1,0} dot(%m, %copy_fusion.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %add.5 = f32[4]{0} add(%v, %exp_fusion.2)
}
"""


def test_groups_of_a_hand_written_module():
    bench = load_script("profile_step")
    comps, instrs = bench.parse_hlo(HLO)
    want = {"conv_fusion.1": "convolution", "exp_fusion.2": "exp", "copy_fusion.3": "layout", "dot.4": "matmul",
            "add.5": "element-wise"}
    assert {n: bench.group_of(n, comps, instrs) for n in want} == want
    assert bench.group_of("ThunkExecutor::Execute", comps, instrs) is None  # not an instruction


def test_small_traced_run_writes_table(tmp_path):
    out = tmp_path / "p.md"
    assert load_script("profile_step").main(["--small", "--shape", "16x16:2", "--warmup", "1", "--note", "smoke",
                                             "--out", str(out)]) == 0
    text = out.read_text()
    rows = re.findall(r"^\| (convolution|matmul|reduction|exp|layout|element-wise) \| (\d+) \| ([\d.]+)% \|", text,
                      re.M)
    groups = {g for g, _, _ in rows}
    assert {"convolution", "matmul"} <= groups, text
    assert abs(sum(float(s) for _, _, s in rows) - 100.0) < 0.5
    assert "16 x 16, batch 2 (--small)" in text and "smoke" in text
