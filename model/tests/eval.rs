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

/// `kfrun eval --judge`: the judge scores chunks of right-padded rows of different lengths
/// exactly as each row alone (the causal mask keeps padding out), scores exactly the
/// continuation's tokens, and refuses a sample longer than its context with one error.
#[test]
fn the_judge_scores_each_continuation_as_alone() {
    use kf_engine::{no_grad, Device, Tensor};
    use kf_model::eval::Judge;
    use kf_model::tokenizer::{BpeTrainOptions, Tokenizer};
    let texts = [
        "the cat sat on the mat and the dog sat on the log",
        "a bird in the hand is worth two in the bush",
        "to be or not to be that is the question",
        "all that glitters is not gold",
        "the quick brown fox jumps over the lazy dog",
        "an apple a day keeps the doctor away",
        "where there is smoke there is fire",
        "every cloud has a silver lining",
        "time and tide wait for no man",
    ];
    let tok = Tokenizer::train_bpe(
        texts.iter().copied(),
        &BpeTrainOptions {
            vocab_size: 300,
            min_frequency: 2,
        },
    )
    .unwrap();
    let mut cfg = small_cfg();
    cfg.vocab_size = 300;
    cfg.mask_token_id = None;
    let model = random_model(&cfg, 9);
    // prompt: the first word; continuation: the rest (split at a word, so the ids are
    // exactly what retokenising the text gives); rows of 9 different lengths
    let (prompts, gens): (Vec<Vec<u32>>, Vec<Vec<u32>>) = texts
        .iter()
        .map(|t| {
            let (p, g) = t.split_once(' ').unwrap();
            (
                tok.encode(p).unwrap(),
                tok.encode(&format!(" {g}")).unwrap(),
            )
        })
        .unzip();
    let judge = Judge {
        model: &model,
        tokenizer: &tok,
        source: &tok,
    };
    let (sum, n) = judge.nll(&prompts, &gens).unwrap();
    assert_eq!(n, gens.iter().map(Vec::len).sum::<usize>());
    let _ng = no_grad();
    let mut alone = 0.0f64;
    for (p, g) in prompts.iter().zip(&gens) {
        let row: Vec<u32> = p.iter().chain(g).copied().collect();
        let t = row.len();
        let x = Tensor::from_vec(row, &[1, t], Device::Cpu).unwrap();
        let lv = model.forward_train(&x).unwrap().to_vec::<f32>().unwrap();
        let v = cfg.vocab_size;
        for (j, &id) in g.iter().enumerate() {
            let l = &lv[(p.len() - 1 + j) * v..(p.len() + j) * v];
            let m = l.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let lse = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            alone += lse - l[id as usize] as f64;
        }
    }
    assert!(
        (sum - alone).abs() <= 1e-6 * alone.abs(),
        "batched {sum} vs alone {alone}"
    );
    // a continuation past the judge's max_seq_len (64): one error naming the limit
    let long = vec![tok.encode(&" the cat sat".repeat(30)).unwrap()];
    let e = judge.nll(&prompts[..1], &long).unwrap_err().to_string();
    assert!(e.contains("max_seq_len 64"), "{e}");
}
