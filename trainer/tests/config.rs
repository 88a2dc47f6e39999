//! The typed config keeps the flat `config.json` of earlier runs and `--set key=value` working.

use trainer::config::{HeadNorm, Level, OptimizerKind, Preset, Targets, TrainConfig};

const BEFORE_SECTIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/config-before-sections.json"
);

fn flat(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn a_run_config_written_before_the_sections_loads_and_round_trips() {
    let cfg = TrainConfig::load(BEFORE_SECTIONS.as_ref()).unwrap();
    assert_eq!(cfg.preset, Preset::MaskDeepR18Small);
    assert_eq!(cfg.model.width, 0.25);
    assert_eq!(cfg.method.levels, vec![Level::C4, Level::C5]);
    assert_eq!(cfg.method.targets, Targets::All);
    assert_eq!(cfg.optim.optimizer, OptimizerKind::Adamw);
    assert_eq!(cfg.data.rotation, 180.0);
    assert_eq!(cfg.run.knn_every, 4);
    // Written back, it is the same file plus the keys added since, at their defaults.
    let mut want = flat(&std::fs::read_to_string(BEFORE_SECTIONS).unwrap());
    for (key, default) in [
        ("knn_per_class", serde_json::json!(100)),
        ("log_every", serde_json::json!(1)),
        ("accumulate", serde_json::json!(1)),
        ("sync_bn", serde_json::json!(true)),
        ("head_bn", serde_json::json!("joint")),
        ("mask_grid", serde_json::Value::Null),
    ] {
        assert!(want.get(key).is_none());
        want.as_object_mut().unwrap().insert(key.into(), default);
    }
    assert_eq!(serde_json::to_value(&cfg).unwrap(), want);
}

#[test]
fn keys_added_later_take_their_defaults_when_missing() {
    let mut old = flat(&std::fs::read_to_string(BEFORE_SECTIONS).unwrap());
    let map = old.as_object_mut().unwrap();
    for key in ["lr_final", "ema_final", "rotation"] {
        map.remove(key);
    }
    let cfg = TrainConfig::from_json(old).unwrap();
    assert_eq!(
        (
            cfg.schedule.lr_final,
            cfg.schedule.ema_final,
            cfg.data.rotation,
            cfg.run.knn_per_class,
            cfg.run.log_every
        ),
        (0.0, 1.0, 0.0, 100, 1)
    );
    assert_eq!((cfg.parallel.accumulate, cfg.parallel.sync_bn), (1, true));
    assert_eq!(cfg.method.head_bn, HeadNorm::Joint);
    assert_eq!(cfg.method.mask_grid, None);
}

#[test]
fn unknown_keys_and_wrong_choices_are_refused_by_name() {
    let mut old = flat(&std::fs::read_to_string(BEFORE_SECTIONS).unwrap());
    old.as_object_mut()
        .unwrap()
        .insert("widht".into(), serde_json::json!(1.0));
    let err = TrainConfig::from_json(old).unwrap_err().to_string();
    assert!(err.contains("`widht`"), "{err}");

    let mut cfg = TrainConfig::preset("byol-r18-small").unwrap();
    assert!(cfg
        .set("no_such_key=1")
        .unwrap_err()
        .to_string()
        .contains("no_such_key"));
    assert!(cfg.set("targets=some").is_err());
    assert!(cfg.set("levels=[\"c6\"]").is_err());
    assert!(cfg.set("preset=resnet").is_err());
    assert!(cfg.set("head_bn=separate").is_err());
    cfg.set("head_bn=per_view").unwrap();
    assert_eq!(cfg.method.head_bn, HeadNorm::PerView);
    cfg.set("optimizer=sgd").unwrap();
    cfg.set("levels=[\"c3\",\"c5\"]").unwrap();
    cfg.set("level_weights=[1,2]").unwrap();
    assert_eq!(cfg.optim.optimizer, OptimizerKind::Sgd);
    assert_eq!(cfg.level_indices(), vec![0, 2]);
    cfg.validate().unwrap();
}

#[test]
fn every_preset_parses_back_from_its_name() {
    for preset in Preset::ALL {
        let cfg = TrainConfig::preset(preset.name()).unwrap();
        assert_eq!(cfg.preset, preset);
        cfg.validate().unwrap();
        let json = serde_json::to_value(&cfg).unwrap();
        assert_eq!(TrainConfig::from_json(json).unwrap(), cfg);
    }
}

#[test]
fn the_paper_preset_differs_from_the_small_default_only_in_its_targets() {
    let default = TrainConfig::preset("maskdeep-r18-small").unwrap();
    let paper = TrainConfig::preset("maskdeep-r18-small-paper").unwrap();
    assert_eq!(default.method.targets, Targets::Cross);
    assert_eq!(paper.method.targets, Targets::All);
    let mut same = paper.clone();
    same.method.targets = Targets::Cross;
    same.preset = default.preset;
    assert_eq!(same, default);
}
