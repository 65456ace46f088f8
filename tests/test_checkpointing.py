"""AtomicCheckpointSaver: every rotated file (interval, best metric, final) is replaced only after
its successor is complete; stale temporary files and an interrupted run's checkpoints are cleaned up.

In-process and fast; the real SIGKILL during a write is in test_resume_and_ddp.py.
"""

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from selfmedmae_components.handlers import AtomicCheckpointSaver, EpochLossLogger


def make_engine(net):
    engine = Engine(lambda e, batch: {"loss": torch.tensor(float(batch))})
    engine.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e):  # a key metric that improves every epoch, so the best model is rotated every epoch
        e.state.metrics["score"] = e.state.epoch / 10

    return engine


def resume_at_epoch_2(engine):
    """What attach_resume's CheckpointLoader does when the run starts (after the saver attached)."""
    engine.load_state_dict({"epoch": 2, "max_epochs": 4, "epoch_length": 2})


def make_saver(folder, net):
    state = {"model": net, "opt": torch.optim.SGD(net.parameters(), lr=0.1)}
    return AtomicCheckpointSaver(
        save_dir=str(folder),
        save_dict=state,
        file_prefix="mae",
        save_interval=1,
        n_saved=1,
        save_final=True,
        final_filename="final.pt",
        save_key_metric=True,
        key_metric_name="score",
        key_metric_filename="best.pt",
    )


@pytest.fixture
def writes(monkeypatch, tmp_path):
    """Records, for every torch.save, the file being written and the complete checkpoints beside it."""
    seen = []
    real_save = torch.save

    def spy(obj, f, **kwargs):
        present = {p.name for p in tmp_path.glob("*.pt")}
        for name in present:
            torch.load(tmp_path / name, weights_only=True)  # complete, or this raises
        seen.append((Path(f.name).name, present))
        real_save(obj, f, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    return seen


def test_every_rotated_file_is_replaced_only_after_its_successor_is_complete(tmp_path, writes):
    net = torch.nn.Linear(2, 2)
    engine = make_engine(net)
    saver = make_saver(tmp_path, net)
    saver.attach(engine)
    engine.run([1, 2], max_epochs=3)
    saver.completed(engine)  # a second final save (MONAI also saves on an exception) rotates final.pt

    # what was complete when each write began: once a kind of checkpoint exists, it never goes missing
    kinds = [{"interval" if "checkpoint_epoch=" in n else n for n in present} for _, present in writes]
    assert len(writes) == 3 + 3 + 2  # best and interval every epoch, final twice
    for i in range(1, len(kinds)):
        assert kinds[i - 1] <= kinds[i], f"write {i} ({writes[i][0]}) began with only {sorted(writes[i][1])}"
    assert kinds[-1] == {"interval", "best.pt", "final.pt"}
    # each file is written under a hidden temporary name beside its target, then renamed
    assert all(name.startswith(".") and name.endswith(".tmp") for name, _ in writes)
    # n_saved=1 holds, and nothing temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "final.pt", "mae_checkpoint_epoch=3.pt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    engine = make_engine(net)
    AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": net}, file_prefix="mae", save_interval=1, n_saved=1
    ).attach(engine)
    real_save, calls = torch.save, []

    def failing_save(obj, f, **kwargs):  # the second checkpoint (epoch 2) fails half-way
        calls.append(f)
        real_save(obj, f, **kwargs)
        if len(calls) == 2:
            raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        engine.run([1, 2], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mae_model_epoch=1.pt"]  # and no temporary file
    torch.load(tmp_path / "mae_model_epoch=1.pt", weights_only=True)


def test_a_resumed_run_cleans_up_what_the_interrupted_run_left(tmp_path):
    # an interrupted run: killed after renaming epoch 2 but before removing epoch 1, and while writing epoch 3
    net = torch.nn.Linear(2, 2)
    for epoch in (1, 2):
        torch.save({"model": net.state_dict()}, tmp_path / f"mae_checkpoint_epoch={epoch}.pt")
    (tmp_path / ".mae_checkpoint_epoch=3.pt.x1y2.tmp").write_bytes(b"PK\x03\x04 half")
    (tmp_path / ".other.pt.abcd.tmp").write_bytes(b"not ours")  # another saver's file: left alone

    engine = make_engine(net)
    saver = make_saver(tmp_path, net)
    saver.attach(engine)
    assert not (tmp_path / ".mae_checkpoint_epoch=3.pt.x1y2.tmp").exists()
    engine.add_event_handler(Events.STARTED, resume_at_epoch_2)
    seen = []
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: seen.append(sorted(p.name for p in tmp_path.glob("mae_*")))
    )
    engine.run([1, 2])
    # epoch 1 and 2 go once epoch 3 is complete; then n_saved=1 holds
    assert seen == [["mae_checkpoint_epoch=3.pt"], ["mae_checkpoint_epoch=4.pt"]]
    assert (tmp_path / ".other.pt.abcd.tmp").exists()


def test_loss_log_keeps_each_epoch_once_after_a_resume(tmp_path):
    log = tmp_path / "loss.csv"
    # the interrupted run logged epochs 1-3 but its last checkpoint was epoch 2
    log.write_text("epoch,iteration,loss,lr\r\n1,2,0.9,0.1\r\n2,4,0.8,0.1\r\n3,6,0.7,0.1\r\n")
    net = torch.nn.Linear(2, 2)
    engine = make_engine(net)
    EpochLossLogger(str(log)).attach(engine)
    engine.add_event_handler(Events.STARTED, resume_at_epoch_2)
    engine.run([1, 2])
    rows = [line.split(",") for line in log.read_text().splitlines()[1:]]
    assert [(r[0], r[2]) for r in rows] == [("1", "0.9"), ("2", "0.8"), ("3", "1.500000"), ("4", "1.500000")]

    log.write_text("step;value\n1;2\n")  # not our log: an error naming it, not a silent overwrite
    fresh = make_engine(net)
    EpochLossLogger(str(log)).attach(fresh)
    with pytest.raises(ValueError, match="loss.csv is not a loss log"):
        fresh.run([1, 2], max_epochs=1)


def _resume_on_rank(rank: int, store: str, ckpt_dirs: list) -> str:
    """What ``attach_resume`` answers on ``rank`` of a gloo run over ``store``: the file it resumes from, or its error."""
    import datetime

    import torch.distributed as dist

    from selfmedmae_components.handlers import attach_resume

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=len(ckpt_dirs),
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        path = attach_resume(Engine(lambda e, b: None), True, ckpt_dirs[rank], "mae", {"model": torch.nn.Linear(1, 1)})
        return f"resumes from {Path(path).name}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def _rank_1(store: str, ckpt_dirs: list, answers) -> None:
    answers.put(_resume_on_rank(1, store, ckpt_dirs))


def resume_in_two_processes(tmp_path, ckpt_dirs) -> dict:
    """Rank 0 in this process (so that a mutation-testing run sees what it calls), rank 1 in a forked child."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    tmp_path.mkdir()
    store = str(tmp_path / "store")
    child = context.Process(target=_rank_1, args=(store, ckpt_dirs, answers))
    child.start()
    try:
        rank_0 = _resume_on_rank(0, store, ckpt_dirs)
        return {0: rank_0, 1: answers.get(timeout=60)}
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()


def test_the_ranks_of_a_run_resume_from_one_checkpoint_or_none(tmp_path):
    """Two processes (as two nodes): with one shared folder both resume from its newest checkpoint; with folders of
    their own that disagree (a node's stale local bundle_root) both stop with an error naming each rank's choice,
    before either loads anything."""
    shared, stale = tmp_path / "shared", tmp_path / "stale"
    for folder, epochs in ((shared, (2, 4)), (stale, (2,))):
        folder.mkdir()
        for epoch in epochs:
            torch.save({"model": torch.nn.Linear(1, 1).state_dict()}, folder / f"mae_checkpoint_epoch={epoch}.pt")
    assert resume_in_two_processes(tmp_path / "a", [str(shared), str(shared)]) == {
        0: "resumes from mae_checkpoint_epoch=4.pt",
        1: "resumes from mae_checkpoint_epoch=4.pt",
    }
    answers = resume_in_two_processes(tmp_path / "b", [str(shared), str(stale)])
    for rank in (0, 1):
        assert answers[rank].startswith(
            "FileNotFoundError: resume=true: the processes would not resume from one checkpoint (rank 0: "
        ), answers
        assert (
            "rank 0: "
            + str(shared / "mae_checkpoint_epoch=4.pt")
            + "; rank 1: "
            + str(stale / "mae_checkpoint_epoch=2.pt")
            + "). ckpt_dir (bundle_root) must be one folder"
            in answers[rank]
        )
        assert answers[rank].endswith("every node shares."), answers[rank]
    answers = resume_in_two_processes(tmp_path / "c", [str(shared), str(tmp_path / "empty")])
    assert answers[1].startswith("FileNotFoundError: resume=true but no 'mae_checkpoint_epoch=N.pt'")
    assert answers[0].startswith(
        "FileNotFoundError: resume=true: the processes would not resume from one checkpoint (rank 1: resume=true but no"
    ), answers[0]
    assert "rank 0" not in answers[0]  # only the rank that failed is named
    assert "every node shares" in answers[0]


def _checkpoints(folder: Path, epochs, net=None) -> None:
    folder.mkdir(exist_ok=True)
    for epoch in epochs:
        state = (net or torch.nn.Linear(1, 1)).state_dict()
        torch.save({"model": state, "epoch": torch.tensor(epoch)}, folder / f"mae_checkpoint_epoch={epoch}.pt")


def test_resume_loads_the_newest_checkpoint_by_epoch_number_when_the_engine_starts(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    from selfmedmae_components.handlers import attach_resume

    _checkpoints(tmp_path, (2, 9))
    newest = torch.nn.Linear(1, 1)
    with torch.no_grad():
        newest.weight.fill_(7.0)
    torch.save({"model": newest.state_dict()}, tmp_path / "mae_checkpoint_epoch=10.pt")  # 10 > 9, though "1" < "9"
    _checkpoints(tmp_path / "other", (99,))  # another prefix's and another folder's files are not candidates
    torch.save({"model": torch.nn.Linear(1, 1).state_dict()}, tmp_path / "finetune_checkpoint_epoch=50.pt")

    net, engine = torch.nn.Linear(1, 1), Engine(lambda e, b: None)
    path = attach_resume(engine, "true", str(tmp_path), "mae", {"model": net}, map_location="cpu")
    assert path == str(tmp_path / "mae_checkpoint_epoch=10.pt")
    assert f"Resuming from {path}" in capsys.readouterr().out
    assert f"Resuming from {path}" in [r.getMessage() for r in caplog.records]  # and in the run's log
    assert net.weight.item() != 7.0  # loaded when the run starts, not at attach
    engine.run([0], max_epochs=1)
    assert net.weight.item() == 7.0


@pytest.mark.parametrize("resume", [False, "false", 0, "off"])
def test_no_resume_attaches_nothing(tmp_path, resume):
    from selfmedmae_components.handlers import attach_resume

    _checkpoints(tmp_path, (3,))
    engine, net = Engine(lambda e, b: None), torch.nn.Linear(1, 1)
    before = net.weight.detach().clone()
    assert attach_resume(engine, resume, str(tmp_path), "mae", {"model": net}) is None
    engine.run([0], max_epochs=1)
    assert torch.equal(net.weight, before)


def test_resume_without_a_checkpoint_or_with_an_unreadable_name_says_which(tmp_path):
    from selfmedmae_components.handlers import attach_resume

    engine, state = Engine(lambda e, b: None), {"model": torch.nn.Linear(1, 1)}
    with pytest.raises(FileNotFoundError) as error:
        attach_resume(engine, True, str(tmp_path), "mae", state)
    assert str(error.value) == f"resume=true but no 'mae_checkpoint_epoch=N.pt' in {tmp_path} to resume from."
    _checkpoints(tmp_path, (1,))
    (tmp_path / "mae_checkpoint_epoch=last.pt").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        attach_resume(engine, True, str(tmp_path), "mae", state)
    assert str(error.value) == (
        f"resume=true: cannot read the epoch of {[str(tmp_path / 'mae_checkpoint_epoch=last.pt')]}; "
        "expected 'mae_checkpoint_epoch=N.pt'."
    )


def test_score_of_reads_the_number_after_the_last_equals_sign():
    from selfmedmae_components.checkpointing import score_of

    assert score_of(Path("a=b/mae_checkpoint_epoch=12.pt")) == 12
    assert score_of(Path("x=1_checkpoint_epoch=3.pt")) == 3
    assert score_of(Path("mae_checkpoint_epoch=best.pt")) is None
    assert score_of(Path("mae_checkpoint_epoch=-1.pt")) is None


def test_files_hold_the_state_are_written_beside_their_target_and_readable_by_the_group(tmp_path, monkeypatch):
    folders, real_save = [], torch.save
    monkeypatch.setattr(
        torch, "save", lambda obj, f, **kw: folders.append(Path(f.name).parent) or real_save(obj, f, **kw)
    )
    net = torch.nn.Linear(2, 2)
    engine = make_engine(net)
    make_saver(tmp_path, net).attach(engine)
    engine.run([1, 2], max_epochs=1)
    assert folders == [tmp_path] * 3  # the rename stays on one filesystem: atomic
    for name in ("final.pt", "best.pt", "mae_checkpoint_epoch=1.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert torch.equal(saved["model"]["weight"], net.weight), name
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name  # mkstemp's 0600 plus group and other read


def test_a_checkpoint_removed_by_hand_does_not_stop_the_run(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = make_engine(net)
    AtomicCheckpointSaver(
        str(tmp_path),
        {"model": net, "opt": engine.optimizer},
        file_prefix="mae",  # positional
        save_interval=1,
        n_saved=1,
    ).attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: (tmp_path / "mae_checkpoint_epoch=1.pt").unlink())
    engine.run([1, 2], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mae_checkpoint_epoch=3.pt"]


def resumed_run(tmp_path, n_saved, epochs=(1, 2)) -> list:
    """Resume at epoch 2 of 4 in a folder where the interrupted run left ``epochs``; the interval checkpoints
    present after each new epoch."""
    net = torch.nn.Linear(2, 2)
    for epoch in epochs:
        torch.save({"model": net.state_dict()}, tmp_path / f"mae_checkpoint_epoch={epoch}.pt")
    engine = make_engine(net)
    AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"model": net, "opt": engine.optimizer},
        file_prefix="mae",
        save_interval=1,
        n_saved=n_saved,
    ).attach(engine)
    engine.add_event_handler(Events.STARTED, resume_at_epoch_2)
    seen = []
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: seen.append(sorted(p.name[-6:-3] for p in tmp_path.glob("mae_*")))
    )
    engine.run([1, 2])
    return seen


def test_a_resumed_run_keeps_n_saved_across_the_restart(tmp_path, caplog):
    caplog.set_level("INFO")
    (tmp_path / "two").mkdir()
    assert resumed_run(tmp_path / "two", n_saved=2) == [["h=2", "h=3"], ["h=3", "h=4"]]
    removed = [r.getMessage() for r in caplog.records if "superseded" in r.getMessage()]
    assert removed == [
        f"Removing {tmp_path / 'two' / f'mae_checkpoint_epoch={n}.pt'}: superseded by this resumed "
        "run's checkpoint (n_saved=2)."
        for n in (1, 2)
    ]
    (tmp_path / "all").mkdir()  # n_saved None: every checkpoint is kept, the interrupted run's too
    assert resumed_run(tmp_path / "all", n_saved=None)[-1] == ["h=1", "h=2", "h=3", "h=4"]


def test_a_single_object_savers_stale_temporary_file_is_removed_with_a_warning(tmp_path, caplog):
    net = torch.nn.Linear(2, 2)
    stale = tmp_path / ".mae_model_epoch=3.pt.x1y2.tmp"  # a saver of one object names its files after it
    stale.write_bytes(b"PK\x03\x04 half")
    AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": net}, file_prefix="mae", save_interval=1, n_saved=1
    ).attach(make_engine(net))
    assert not stale.exists()
    assert f"Removing {stale}, left by a run that stopped while writing it." in [r.getMessage() for r in caplog.records]


def test_an_iteration_level_saver_resumed_keeps_n_saved_in_iterations(tmp_path):
    """save_interval counted in iterations (epoch_level=False): the interrupted run's files are those up to the
    iteration it resumes from."""
    net = torch.nn.Linear(2, 2)
    for iteration in (2, 4):
        torch.save({"model": net.state_dict()}, tmp_path / f"mae_checkpoint_iteration={iteration}.pt")
    engine = make_engine(net)
    AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"model": net, "opt": engine.optimizer},
        file_prefix="mae",
        save_interval=1,
        epoch_level=False,
        n_saved=1,
    ).attach(engine)
    engine.add_event_handler(Events.STARTED, resume_at_epoch_2)  # iteration 4 of epoch_length 2
    seen = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(sorted(p.name for p in tmp_path.glob("mae_*")))
    )
    engine.run([1, 2])
    assert seen[:2] == [["mae_checkpoint_iteration=5.pt"], ["mae_checkpoint_iteration=6.pt"]]
