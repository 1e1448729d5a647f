"""The search report: a hand-made experiment directory (results.json, an Optuna study with three
trials, checkpoint validations with records, TensorBoard logs; no Ray) turned into one offline page,
then opened in headless Chromium to check that every figure draws."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("optuna")
pytest.importorskip("plotly")

from conftok.calibration import reliability_bins  # noqa: E402
from ray_jobs.report import build_report, main  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOMAINS = ("read", "med")
# trial id, lora_r, lora_alpha, learning_rate, accuracy, calibration error, status
TRIALS = [("t0", 4, 4, 1e-3, 0.50, 0.10, "TERMINATED"),
          ("t1", 8, 16, 5e-4, 0.70, 0.15, "TERMINATED"),  # the best score; t0 and t1 form the Pareto front
          ("t2", 16, 16, 2e-3, 0.40, 0.20, "STOPPED")]  # ASHA-stopped: one validation, no final/
PNGS = ("pareto", "parallel_coordinates", "learning_curves", "reliability", "risk_coverage", "routing")


def write_validation(path, step, accuracy, ce, seed):
    """checkpoint-N/validation.json with 12 records and 10 reliability bins per domain."""
    rng = np.random.default_rng(seed)
    records, reliability, metrics = [], {}, {"val/accuracy": accuracy, "val/calibration_error": ce,
                                             "val/score": accuracy - ce, "step": step}
    for domain in DOMAINS:
        conf = rng.uniform(0, 1, 12)
        correct = rng.uniform(0, 1, 12) < conf
        records += [{"domain": domain, "correct": bool(k), "p_confident": float(c), "token": "<C_X>",
                     "expected_token": "<C_X>" if k else "<U_X>"} for c, k in zip(conf, correct)]
        reliability[domain] = reliability_bins(conf, correct)
        metrics.update({f"val/{domain}/token_accuracy": accuracy, f"val/{domain}/calibration_error": ce,
                        f"val/{domain}/n": 12})
    path.mkdir(parents=True)
    (path / "validation.json").write_text(json.dumps(
        {"metrics": metrics, "domains": {}, "reliability": reliability, "records": records}))
    return metrics


def write_trial(trial_dir, steps, accuracy, ce, seed):
    from torch.utils.tensorboard import SummaryWriter

    history = [write_validation(trial_dir / f"checkpoint-{s}", s, accuracy - 0.1 * (s != steps[-1]), ce, seed + s)
               for s in steps]
    if len(steps) > 1:
        (trial_dir / "final").mkdir()
        (trial_dir / "final" / "final_metrics.json").write_text(json.dumps({"history": history}))
    writer = SummaryWriter(log_dir=str(trial_dir / "logs"))
    for step in range(1, steps[-1] + 1):
        writer.add_scalar("train/loss", 2.0 / step + seed * 0.01, step)
    writer.close()


def write_study(path):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="demo", direction="maximize")
    distributions = {"lora_r": CategoricalDistribution([4, 8, 16]), "lora_alpha_per_rank": CategoricalDistribution([1, 2]),
                     "learning_rate": FloatDistribution(3e-4, 3e-3, log=True)}
    for _, r, alpha, lr, acc, ce, _ in TRIALS:
        study.add_trial(optuna.trial.create_trial(params={"lora_r": r, "lora_alpha_per_rank": alpha // r, "learning_rate": lr},
                                                  distributions=distributions, value=acc - ce))


def make_experiment(root):
    exp = root / "demo"
    rows = []
    for i, (trial, r, alpha, lr, acc, ce, status) in enumerate(TRIALS):
        steps = [2] if status == "STOPPED" else [2, 4]
        write_trial(exp / "trials" / trial, steps, acc, ce, seed=10 * i)
        rows.append({"trial": trial, "lora_r": r, "lora_alpha": alpha, "learning_rate": lr, "accuracy": acc,
                     "calibration_error": ce, "score": acc - ce, "validations": len(steps), "step": steps[-1],
                     "status": status, "time_s": 30.0 + i,
                     **{f"val/{d}/{m}": v for d in DOMAINS for m, v in
                        (("token_accuracy", acc), ("calibration_error", ce), ("n", 12.0))}})
    write_study(exp / "study.db")
    (exp / "results.json").write_text(json.dumps(
        {"objective": "score", "lambda": 1.0, "wall_s": 95.0, "best_trial": "t1", "trials": rows}))
    return exp


@pytest.fixture(scope="class")
def report(tmp_path_factory):
    exp = make_experiment(tmp_path_factory.mktemp("report"))
    return exp, build_report(exp)


def run_chromium(page, tmp_path, *args, timeout=90):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path}", "--window-size=1400,4000",
           "--virtual-time-budget=10000",  # let the load handler and Plotly finish before the dump
           *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def without_script_bodies(page_html):
    """Inline scripts (Plotly's JS) quote URLs in strings; only the markup can fetch anything."""
    return re.sub(r"(<script[^>]*>).*?(</script>)", r"\1\2", page_html, flags=re.S | re.I)


class TestReport:
    def test_page_is_self_contained(self, report):
        exp, page = report
        assert page == exp / "report" / "report.html"
        text = page.read_text()
        markup = without_script_bodies(text)
        assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", markup, re.I)
        assert not re.search(r"<script[^>]*\bsrc\s*=", markup, re.I)  # every script inline
        assert not re.search(r"url\(\s*['\"]?https?:", markup, re.I)
        assert text.count("* plotly.js v") == 1  # Plotly's JS once, for every figure
        assert markup.count("data:image/png;base64,") == len(PNGS)

    def test_table_has_a_row_per_trial(self, report):
        _, page = report
        table = re.search(r"<table id=trials>.*?</table>", page.read_text(), re.S).group(0)
        assert re.findall(r"<tr data-trial='(\w+)'", table) == [t[0] for t in TRIALS]
        assert "<tr data-trial='t1' class=best>" in table
        assert "read (n=12)" in table and "med (n=12)" in table
        assert "title='validations'>vals</th>" in table  # as the console's table has it

    def test_every_png_written(self, report):
        exp, _ = report
        for name in PNGS:
            data = (exp / "report" / f"{name}.png").read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    def test_missing_records_skip_the_curves_with_a_note(self, report, tmp_path):
        """Validations written before conftok kept per-row records: curves skipped, the rest drawn."""
        exp = shutil.copytree(report[0], tmp_path / "demo", ignore=shutil.ignore_patterns("report"))
        for path in (exp / "trials" / "t1").glob("checkpoint-*/validation.json"):
            validation = json.loads(path.read_text())
            del validation["records"]
            path.write_text(json.dumps(validation))
        page = build_report(exp, tmp_path / "old")
        assert "risk-coverage and routing curves skipped" in page.read_text()
        assert (tmp_path / "old" / "reliability.png").is_file()
        assert not (tmp_path / "old" / "routing.png").exists()

    def test_directory_without_results_names_the_file(self, tmp_path, capsys):
        assert main([str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "results.json") in err and "ray_jobs.tune" in err

    def test_page_renders_in_chromium(self, report, tmp_path):
        if not shutil.which(CHROMIUM):
            pytest.skip(f"{CHROMIUM} not found: .ci/run installs it (apt-get install -y chromium)")
        _, page = report
        shot = tmp_path / "report.png"
        run_chromium(page, tmp_path / "profile-shot", f"--screenshot={shot}")
        assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 100_000
        dom = run_chromium(page, tmp_path / "profile-dom", "--dump-dom").stdout
        check = re.search(r"<div id=\"render-check\"[^>]*>", dom)
        assert check, "the page's load handler never ran"
        counts = {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', check.group(0))}
        assert counts["images"] == len(PNGS) and counts["images-loaded"] == len(PNGS), counts
        assert counts["plots"] >= 2 and counts["plots-rendered"] == counts["plots"], counts  # parallel + importances
        table = re.search(r"<table id=\"trials\">.*?</table>", dom, re.S).group(0)
        assert len(re.findall(r"<tr data-trial=", table)) == len(TRIALS)
        assert not re.search(r"<(?:img|script|link|iframe)[^>]+(?:src|href)=\"https?:", dom)


class TestReportFixes:
    def test_the_best_trials_plots_are_from_its_reported_step(self, report, tmp_path):
        """A trial ASHA stopped can validate once more after the report it was stopped at: results.json's step and
        adapter are the reported one's, and so are the plots (not the last checkpoint's)."""
        exp = shutil.copytree(report[0], tmp_path / "demo", ignore=shutil.ignore_patterns("report"))
        results = json.loads((exp / "results.json").read_text())
        best = next(r for r in results["trials"] if r["trial"] == results["best_trial"])
        assert best["step"] == 4
        best["step"] = 2  # reported at step 2; checkpoint-4 came after
        (exp / "results.json").write_text(json.dumps(results))
        page = build_report(exp).read_text()
        assert f"{exp / 'trials' / 't1' / 'checkpoint-2' / 'validation.json'}</code> (step 2)" in page
        assert "checkpoint-4/validation.json" not in page

    def test_a_rebuild_gives_the_same_page(self, report, tmp_path):
        exp = shutil.copytree(report[0], tmp_path / "demo", ignore=shutil.ignore_patterns("report"))
        first = build_report(exp, tmp_path / "a").read_bytes()
        assert build_report(exp, tmp_path / "b").read_bytes() == first  # Plotly's div ids fixed, not uuid4

    def test_a_failed_build_leaves_the_last_report_whole(self, report, tmp_path, monkeypatch):
        import ray_jobs.report as report_module

        exp = shutil.copytree(report[0], tmp_path / "demo", ignore=shutil.ignore_patterns("report"))
        page = build_report(exp)
        before = {p.name: p.read_bytes() for p in page.parent.iterdir()}

        def fail(*args, **kwargs):
            raise ValueError("a trial's validation.json is unreadable")

        monkeypatch.setattr(report_module, "plot_learning_curves", fail)
        with pytest.raises(ValueError, match="unreadable"):
            build_report(exp)
        assert {p.name: p.read_bytes() for p in page.parent.iterdir()} == before  # no temporary left either

    def test_the_calibration_estimator_is_named(self, report, tmp_path):
        exp = shutil.copytree(report[0], tmp_path / "demo", ignore=shutil.ignore_patterns("report"))
        results = json.loads((exp / "results.json").read_text())
        (exp / "results.json").write_text(json.dumps({**results, "calibration": {"beta": 8, "p": "2"}}))
        page = build_report(exp).read_text()
        assert "adaptive bins of beta = 8 rows" in page and "L2 norm" in page and "10 equal-width bins" in page
