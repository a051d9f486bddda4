"""The experiment: rows (methods) × tasks × seeds, each row's sweep a front; resumable from committed records.

A row (hlora.methods.Row, declared by its method's file: `ROWS` next to the config) names everything about one
way to run a method: its label, where stage μ starts (`fresh` adapter, the stage-`nu` adapter, `none` = no
training, or another row's id = evaluate that row's trained adapter, as WiSE-FT does), its method config, the
field its front sweeps and its place in the report. ROWS here is every method's rows in registry order. One code
path runs them all; nothing here asks for a method's name.

Layout: OUT/ (work, never committed: run directories, adapters, caches) holds seed<S>/general/ (stage ν,
shared by the rows that start from it), cache/ (e.g. the EWC Fisher, shared by seeds), runs/<task>-s<seed>-
<settings hash>/ (stage μ: cells that train alike share a run) and evals/ (one evaluation per adapter and
evaluation setting).
RECORDS/<cell>.json (default OUT/records) holds one small record per finished cell: a cell with a record
is done, so a grid whose records are committed resumes on a fresh machine from the repository alone.
results.json (all records, config order) and report/ are written next to RECORDS.
"""
from .grid import demo, records_dir, run_experiment, summary_table
from .plan import ROWS, TRAIN_FIELDS, Cell, ExperimentConfig, Row, plan
from .records import RECORD_VERSION, run_cell, settings_hash
from .run import EVALUATOR_VERSION, _canonical  # noqa: F401  (_canonical: tests check the hash rule)

__all__ = ["ROWS", "TRAIN_FIELDS", "Cell", "ExperimentConfig", "Row", "plan", "run_cell", "settings_hash", "RECORD_VERSION",
           "EVALUATOR_VERSION", "records_dir", "run_experiment", "summary_table", "demo"]
