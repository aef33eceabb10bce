"""The study store's names (study/store.py): every run folder lies in its stage's root, and the
file patterns the train loop uses match what they name."""

import fnmatch

from study.store import StudyStore, parse_run_key, run_key


def test_run_folders_lie_in_their_stages_roots(tmp_path):
    store = StudyStore(tmp_path)
    assert store.run_dir("resnet18", 0).parent == store.train_root
    assert store.cams_dir("resnet18", 0).parent == store.cams_root
    assert store.sanity_dir("resnet18", 0, True).parent == store.sanity_root
    assert store.maps_dir("resnet18", 0, True) == store.sanity_dir("resnet18", 0, True)
    assert store.controls_dir("resnet18", 0) == store.controls_root / "resnet18-seed0"
    assert {store.train_root.name, store.cams_root.name, store.sanity_root.name, store.controls_root.name} == {
        "train", "cams", "sanity", "controls"}


def test_run_keys_round_trip():
    assert run_key("resnet50", 2) == "resnet50-seed2" and parse_run_key("resnet50-seed2") == ("resnet50", 2, False)
    assert parse_run_key(run_key("vit_small", 0, permuted=True)) == ("vit_small", 0, True)


def test_the_best_checkpoint_glob_matches_every_best_checkpoint_and_nothing_else():
    names = [StudyStore.BEST_CHECKPOINT.format(epoch=epoch) for epoch in (1, 12, 1234)]
    assert names[0] == "best-e0001.pt"
    assert all(fnmatch.fnmatch(name, StudyStore.BEST_CHECKPOINTS) for name in names)
    assert not any(fnmatch.fnmatch(name, StudyStore.BEST_CHECKPOINTS)
                   for name in (StudyStore.CHECKPOINT, StudyStore.MODEL, StudyStore.DONE))


def test_the_study_file_names_the_study(tmp_path):
    store = StudyStore(tmp_path)
    assert store.study_path == tmp_path / StudyStore.STUDY_FILE
    store.study_id()
    assert store.study_path.is_file()
