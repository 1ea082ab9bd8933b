"""Training admin and CLI edges, in process: damaged checkpoints, ``train status --follow`` on an
observer without test data, and ``train start``'s participant checks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from chimera.node import cli, cli_train
from chimera.node.admin import EXIT_USAGE, AdminError
from chimera.protocol.identity import SigningIdentity

# ------------------------------------------------------------------ damaged checkpoints


def _resumable_service(tmp_path: Path):
    """A service, a one-participant job and its value (committed, not yet applied)."""
    from chimera.consensus.training import JobSpec, encode_log_value
    from chimera.node.store import Store
    from chimera.node.training_service import TrainingService

    identity = SigningIdentity.generate()
    me = identity.peer_id
    job = JobSpec(name="j", model_kind="sgd_classifier", n_features=8, classes=(0, 1, 2), rounds=5,
                  learning_rate=0.1, participants=(me,), quorum=1, round_deadline_s=5.0)
    data_dir = tmp_path / "peer"
    data_dir.mkdir()
    node = SimpleNamespace(peer_id=me, identity=identity, data_dir=data_dir, store=Store(data_dir), counters=Counter(),
                           consensus=None, network=SimpleNamespace(genesis=(me,), network_id=b"\x05" * 32),
                           config=SimpleNamespace(max_message_bytes=1 << 20, training_test_poison="",
                                                  training_test_drop_updates_from="", training_fetch_interval_s=1.0))
    return TrainingService(node, 0), job, encode_log_value(job)


def _checkpoint(svc, job_id: bytes, number: int, params: dict, digest: bytes) -> None:
    from chimera.node.training_service import write_npz_atomic

    path = svc.node.data_dir / f"round-{number}.npz"
    write_npz_atomic(path, params)
    svc.store.db.execute("INSERT INTO fl_checkpoints(job_id, round, digest, path, committed_ms, next_epoch) "
                         "VALUES(?,?,?,?,?,?)", (job_id, number, digest, str(path), 0, 0))


@pytest.mark.parametrize("damage", ["shape", "names", "dtype", "truncated", "bad_deflate"])
def test_a_checkpoint_of_the_wrong_shape_falls_back_to_an_older_one_and_export_says_why(tmp_path, damage):
    """A checkpoint file whose tensors have other shapes (or names, or a dtype that is no
    number) than the job's model is damage like any other: the restart resumes from the
    previous checkpoint (it was an uncaught UpdateRejected out of node start), and
    ``train_export`` of it is a clear AdminError."""
    from chimera.consensus.aggregation import aggregate_hash
    from chimera.consensus.training import job_id_of

    svc, job, value = _resumable_service(tmp_path)
    job_id, spec = job_id_of(value), job.model_spec()
    good = {k: v + 1 for k, v in spec.zeros().items()}
    _checkpoint(svc, job_id, 1, good, aggregate_hash(good, spec))
    bad = {"shape": {k: np.zeros(v.size + 1) for k, v in good.items()},
           "names": {"w": np.zeros(3)},
           "dtype": {k: np.zeros(v.shape, dtype=[("a", "f8"), ("b", "i4")]) for k, v in good.items()}
           }.get(damage, good)
    _checkpoint(svc, job_id, 2, bad, b"\x07" * 32)
    path = svc.node.data_dir / "round-2.npz"
    if damage == "truncated":  # a torn file: np.load raised zipfile.BadZipFile out of node start
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "bad_deflate":  # a compressed member with damaged bytes: zlib.error
        import io
        import zipfile
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for k, v in good.items():
                z.writestr(f"{k}.npy", (lambda b: (np.save(b, v), b.getvalue())[1])(io.BytesIO()))
        data = bytearray(buf.getvalue())
        data[60:80] = b"\xff" * 20  # inside the first member's deflate stream
        path.write_bytes(bytes(data))

    svc._apply_value(3, value, 0.0, epoch=0, replay=True)  # the job's commit, as the restart replays it
    assert svc.jobs[job_id].core.model_round == 1
    assert aggregate_hash(svc.jobs[job_id].core.model, spec) == aggregate_hash(good, spec)
    assert svc.counters["training_checkpoint_unusable"] == 1
    assert svc.counters["training_resumed_from_checkpoint"] == 1

    unreadable = damage in ("truncated", "bad_deflate")
    with pytest.raises(AdminError, match=r"round-2\.npz unreadable" if unreadable
                       else r"round-2\.npz does not hold this job's model"):
        svc.export(None)
    svc.store.close()


# ------------------------------------------------------------------ train status --follow


def _job(state: str, rounds: list[int], total: int = 3, accuracy: float | None = None) -> dict:
    """A train_status job of an observer without test data (accuracy and loss None)."""
    return {"job_id": "ab" * 32, "name": "digits", "state": state, "round": max(rounds, default=1),
            "model_round": max(rounds, default=0), "rounds_total": total,
            "last_error": "this node has no training data: set training_data", "participant": False,
            "rule": "fedavg", "participants": 3, "quorum": 3,
            "rounds": [{"round": n, "digest": "cd" * 32, "accuracy": accuracy, "loss": accuracy,
                        "participants": 3, "round_s": 1.0, "fit_s": None, "bytes_sent": 0, "committed_ms": 1}
                       for n in rounds]}


def test_follow_ends_on_an_observer_whose_rounds_have_no_accuracy(node_answers, capsys):
    """An observer without test data scores no round: ``--follow`` used to poll forever. It
    prints each committed round ("-" for accuracy and loss) and ends once the job finished
    with its last round committed here; a finished job whose last round's row is not written
    yet is still followed."""
    node_answers["answers"] = [{"jobs": [_job("observing", [1])]}, {"jobs": [_job("finished", [1, 2])]},
                          {"jobs": [_job("finished", [1, 2, 3])]}, {"jobs": [_job("finished", [1, 2, 3])]}]
    code = cli.main(["train", "status", "--follow", "--interval", "0.2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == [f"{'ab' * 8} digits: round {n}/3 accuracy - loss - updates 3 time 1.00 s"
                                for n in (1, 2, 3)]
    assert node_answers["polls"] == 3


def test_follow_json_ends_on_an_observer_and_keeps_the_rounds_nulls(node_answers, capsys):
    import json

    node_answers["answers"] = [{"jobs": [_job("finished", [1], total=1)]}]
    assert cli.main(["train", "status", "--follow", "--json"]) == 0
    docs = [json.loads(line)["result"] for line in capsys.readouterr().out.splitlines()]
    assert [(d["event"], d["round"], d["accuracy"]) for d in docs] == [("round", 1, None)]


def test_finished_needs_the_last_round_committed_not_its_accuracy():
    assert cli_train._finished({"jobs": [_job("finished", [1, 2, 3])]})
    assert cli_train._finished({"jobs": [_job("finished", [1, 2, 3], accuracy=0.9)]})
    assert not cli_train._finished({"jobs": [_job("finished", [1, 2])]})
    assert not cli_train._finished({"jobs": [_job("observing", [1, 2, 3])]})
    assert not cli_train._finished({"jobs": [_job("finished", [1, 2, 3]), _job("running", [1])]})
    assert not cli_train._finished({"jobs": []})


# ------------------------------------------------------------------ train start: participants


@pytest.fixture
def validators():
    return sorted(SigningIdentity.generate().peer_id for _ in range(4))


def _start(validators: list[str], text: str, sklearn_version: str | None = "1.5.2"):
    """``job_from_args`` of a node whose current epoch has ``validators`` (and that runs
    scikit-learn ``sklearn_version``, None: not installed)."""
    from chimera.node.training_service import TrainingService

    fake = SimpleNamespace(consensus=SimpleNamespace(core=SimpleNamespace(
        table=SimpleNamespace(weights={p: 1 for p in validators}))), sklearn_version=sklearn_version)
    base = ('name="d"\nmodel_kind="sgd_classifier"\nn_features=64\nclasses=[0,1]\nrounds=2\n'
            'learning_rate=0.1\nround_deadline_s=5.0\n')
    return TrainingService.job_from_args(fake, base + text)


def _usage_error(validators: list[str], text: str) -> str:
    with pytest.raises(AdminError) as err:
        _start(validators, text)
    assert err.value.code == EXIT_USAGE
    return str(err.value)


def test_an_empty_participant_list_is_named_not_a_quorum_of_0(validators):
    message = _usage_error(validators, "participants=[]\n")
    assert "participants: the list is empty" in message and "quorum" not in message


def test_a_participant_listed_twice_is_an_error_naming_it(validators):
    p = validators[0]
    message = _usage_error(validators, f'participants=["{p}", "{validators[1]}", "{p}"]\n')
    assert f"{p!r} listed more than once" in message
    # two identical ids and "quorum 1 of 1" was accepted as a one-participant job
    assert "listed more than once" in _usage_error(validators, f'participants=["{p}", "{p}"]\nquorum=1\n')


@pytest.mark.parametrize("text,expected", [
    ('rule="krum"\nbyzantine_f=1\n', "rule krum with f=1 needs at least 5 participants"),  # the 4 validators
    ('rule="multi_krum"\nbyzantine_f=1\nquorum=4\n', "rule multi_krum with f=1 needs at least 5 participants"),
    ('rule="median"\nbyzantine_f=2\n', "rule median with f=2 needs at least 5 participants"),
])
def test_too_few_participants_for_the_rule_is_named_before_the_quorum(validators, text, expected):
    message = _usage_error(validators, text)
    assert f"{expected}, the job has 4" in message and "quorum" not in message, message
    explicit = "participants=[" + ", ".join(f'"{p}"' for p in validators) + "]\n"
    assert "the job has 4" in _usage_error(validators, text + explicit)


def test_participant_checks_leave_good_jobs_and_other_fields_alone(validators):
    job = _start(validators, 'rule="trimmed_mean"\nbyzantine_f=1\n')
    assert (job.quorum, job.participants) == (3, tuple(validators))
    job = _start(validators, f'participants=["{validators[2]}", "{validators[0]}"]\n')
    assert job.participants == (validators[0], validators[2])
    assert "byzantine_f" in _usage_error(validators, 'rule="krum"\nbyzantine_f="1"\n')
    assert "byzantine_f" in _usage_error(validators, 'rule="krum"\nbyzantine_f=-1\n')
    assert "byzantine_f" in _usage_error(validators, 'rule="krum"\nbyzantine_f=' + "9" * 4000 + "\n")
    assert "rule" in _usage_error(validators, 'rule="nonsense"\nbyzantine_f=1\n')


def test_a_screened_job_records_the_proposers_sklearn_version(validators):
    """The anomaly screen is reproducible only with one scikit-learn version (PROTOCOL §17.7):
    a job with detect_anomalies records the proposing node's unless the file names one; a
    node without scikit-learn cannot say which (an error, unless the file names it)."""
    from chimera.node.training_service import installed_sklearn_version

    assert _start(validators, "detect_anomalies=true\n").sklearn_version == "1.5.2"
    assert _start(validators, 'detect_anomalies=true\nsklearn_version="1.4.0"\n').sklearn_version == "1.4.0"
    assert _start(validators, "").sklearn_version == ""  # no screen: no version
    assert "only for a job with detect_anomalies" in _usage_error(validators, 'sklearn_version="1.4.0"\n')
    with pytest.raises(AdminError, match="scikit-learn is not installed"):
        _start(validators, "detect_anomalies=true\n", sklearn_version=None)
    assert _start(validators, 'detect_anomalies=true\nsklearn_version="1.4.0"\n',
                  sklearn_version=None).sklearn_version == "1.4.0"
    import sklearn

    assert installed_sklearn_version() == sklearn.__version__
