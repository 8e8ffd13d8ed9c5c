//! The evaluation's push-forward agreement (issue 5) is aligned with generation: the
//! teacher's own AR samples agree with its window rollouts everywhere (same `u` per
//! position), a perturbed sequence does not, and document prompts come from the shard.

mod common;

use common::{ids, random_model, small_cfg};
use kf_model::eval::{agreement, EvalOptions, Models};
use kf_model::generate::{generate, GenerateOptions};

#[test]
fn ar_samples_agree_with_teacher_rollouts() {
    let cfg = small_cfg();
    let teacher = random_model(&cfg, 3);
    let v = cfg.vocab_size;
    let prompts: Vec<Vec<u32>> = (0..3).map(|b| ids(1, 4, v, 50 + b)).collect();
    for tau in [1.0, 0.6] {
        let opts = EvalOptions {
            n_prompts: 3,
            prompt_len: 4,
            max_new: 10,
            seed: 11,
            tau,
            penalties: vec![0.0],
            vocab_limit: None,
            ks: None,
        };
        let g = generate(
            &teacher,
            &prompts,
            &GenerateOptions {
                max_new: 10,
                tau,
                seed: 11,
                ..Default::default()
            },
            |_, _| Ok(()),
        )
        .unwrap();
        let be = Models {
            teacher: &teacher,
            student: None,
        };
        for k in [1, 3, 4] {
            let (t, w, n) = agreement(&be, v, &prompts, &g.tokens, k, &opts).unwrap();
            assert_eq!(t, 30, "tau {tau} K {k}: tokens");
            assert_eq!(
                (w, n),
                (n, 3 * 10usize.div_ceil(k)),
                "tau {tau} K {k}: windows"
            );
        }
        // change one token of row 1 at position 5: its window disagrees there
        let mut bad = g.tokens.clone();
        bad[1][5] = (bad[1][5] + 1) % v as u32;
        let (t, w, n) = agreement(&be, v, &prompts, &bad, 4, &opts).unwrap();
        assert!(t < 30, "tau {tau}: a changed token still agrees");
        assert!(w < n, "tau {tau}: a changed window still agrees");
    }
}
