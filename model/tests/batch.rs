//! Continuous batching at the step level (`kf_model::batch`): sequences that join a running
//! batch at different steps, with different prompts, k, temperatures, penalties and seeds,
//! produce exactly what `generate` / `generate_pflm` produce for each alone; prompt scoring
//! equals the full forward's log-probabilities; bad requests are refused by field.

mod common;

use common::{ids, random_model, random_student, small_cfg};
use kf_model::batch::{step, token_logprobs, Finish, Model, SeqParams, Sequence};
use kf_model::generate::{generate, GenerateOptions};
use kf_model::pflm::{generate_pflm, PflmGenerateOptions};

/// Runs the sequences through `step`, sequence `i` joining at step `join[i]`; returns each
/// one's tokens (and log-probs).
fn run_joined(model: &Model, params: &[SeqParams], join: &[usize]) -> Vec<(Vec<u32>, Vec<f64>)> {
    let mut seqs: Vec<Option<Sequence>> = (0..params.len()).map(|_| None).collect();
    let mut out = vec![(vec![], vec![]); params.len()];
    for t in 0.. {
        for (i, p) in params.iter().enumerate() {
            if join[i] == t {
                seqs[i] = Some(Sequence::new(model, p.clone()).unwrap());
            }
        }
        let idx: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].as_ref().is_some_and(|s| s.finished().is_none()))
            .collect();
        if idx.is_empty() && join.iter().all(|&j| j < t) {
            break;
        }
        if idx.is_empty() {
            continue;
        }
        let mut live: Vec<&mut Sequence> = seqs
            .iter_mut()
            .flatten()
            .filter(|s| s.finished().is_none())
            .collect();
        let outs = step(model, &mut live).unwrap();
        for (i, o) in idx.iter().zip(outs) {
            out[*i].0.extend(o.tokens);
            out[*i].1.extend(o.logprobs);
        }
    }
    out
}

#[test]
fn ar_sequences_joining_at_any_step_equal_each_alone() {
    let cfg = small_cfg();
    let teacher = random_model(&cfg, 11);
    let v = cfg.vocab_size;
    let lens = [5, 1, 9, 3];
    let params: Vec<SeqParams> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| SeqParams {
            max_new: 6 + i,
            tau: [1.0, 0.7, 0.0, 1.3][i],
            seed: 3 + i as u64,
            stream: 10 * i as u64,
            logprobs: true,
            ..SeqParams::new(ids(1, l, v, 40 + i as u64))
        })
        .collect();
    let model = Model::Ar(teacher);
    let got = run_joined(&model, &params, &[0, 0, 2, 5]);
    let Model::Ar(teacher) = &model else {
        unreachable!()
    };
    for (i, p) in params.iter().enumerate() {
        let alone = generate(
            teacher,
            std::slice::from_ref(&p.prompt),
            &GenerateOptions {
                max_new: p.max_new,
                tau: p.tau,
                seed: p.seed,
                first_stream: p.stream,
                ..Default::default()
            },
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(got[i].0, alone.tokens[0], "sequence {i}");
        // each token's log-prob is the full forward's
        let full: Vec<u32> = p.prompt.iter().chain(&got[i].0).copied().collect();
        let lp = token_logprobs(teacher, &full).unwrap();
        let want = &lp[p.prompt.len() - 1..];
        for (a, b) in got[i].1.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "sequence {i}: log-prob {a} vs {b}");
        }
        assert_eq!(got[i].1.len(), p.max_new);
    }
}

#[test]
fn students_with_mixed_k_and_penalties_equal_each_alone() {
    let cfg = small_cfg();
    let v = cfg.vocab_size;
    let model = Model::Pflm(random_student(4, 21));
    let cases = [
        (7, 4, 0.0, 1.0),
        (1, 2, 0.5, 0.8),
        (12, 3, 1.0, 1.0),
        (4, 1, 0.0, 0.5),
    ];
    let params: Vec<SeqParams> = cases
        .iter()
        .enumerate()
        .map(|(i, &(l, k, pen, tau))| SeqParams {
            max_new: 9 + i,
            tau,
            k,
            penalty: pen,
            seed: 5,
            stream: i as u64,
            ..SeqParams::new(ids(1, l, v, 60 + i as u64))
        })
        .collect();
    let got = run_joined(&model, &params, &[0, 1, 1, 3]);
    let Model::Pflm(student) = &model else {
        unreachable!()
    };
    for (i, p) in params.iter().enumerate() {
        let alone = generate_pflm(
            student,
            std::slice::from_ref(&p.prompt),
            &PflmGenerateOptions {
                base: GenerateOptions {
                    max_new: p.max_new,
                    tau: p.tau,
                    seed: p.seed,
                    first_stream: p.stream,
                    ..Default::default()
                },
                k: p.k,
                freq_penalty: p.penalty,
            },
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(got[i].0, alone.tokens[0], "sequence {i} (k {})", p.k);
        assert_eq!(got[i].0.len(), p.max_new);
    }
}

#[test]
fn scoring_a_prompt_equals_the_full_forward_and_eos_stops() {
    let cfg = small_cfg();
    let v = cfg.vocab_size;
    let model = Model::Ar(random_model(&cfg, 12));
    let prompt = ids(1, 10, v, 77);
    let mut s = Sequence::new(
        &model,
        SeqParams {
            max_new: 0,
            prompt_logprobs: true,
            ..SeqParams::new(prompt.clone())
        },
    )
    .unwrap();
    let o = step(&model, &mut [&mut s]).unwrap().remove(0);
    assert!(o.tokens.is_empty());
    assert_eq!(o.finished, Some(Finish::Length));
    let Model::Ar(m) = &model else { unreachable!() };
    let want = token_logprobs(m, &prompt).unwrap();
    let got = o.prompt_logprobs.unwrap();
    assert_eq!(got.len(), 9);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // EOS: greedy, with the eos set to the first greedy token, ends after one token
    let p = SeqParams {
        tau: 0.0,
        max_new: 5,
        ..SeqParams::new(prompt.clone())
    };
    let first = step(
        &model,
        &mut [&mut Sequence::new(&model, p.clone()).unwrap()],
    )
    .unwrap()[0]
        .tokens[0];
    let mut s = Sequence::new(
        &model,
        SeqParams {
            eos: Some(first),
            ..p
        },
    )
    .unwrap();
    let o = step(&model, &mut [&mut s]).unwrap().remove(0);
    assert_eq!((o.tokens, o.finished), (vec![first], Some(Finish::Eos)));
    assert!(
        step(&model, &mut [&mut s]).is_err(),
        "a finished sequence is refused"
    );
}

#[test]
fn bad_requests_name_the_field() {
    let cfg = small_cfg();
    let ar = Model::Ar(random_model(&cfg, 1));
    let st = Model::Pflm(random_student(2, 2));
    let p = SeqParams::new(vec![1, 2, 3]);
    let err = |m: &Model, p: SeqParams| format!("{:#}", Sequence::new(m, p).err().unwrap());
    assert!(err(&ar, SeqParams::new(vec![])).starts_with("prompt"));
    assert!(err(&ar, SeqParams::new(vec![1, 97])).contains("97"));
    assert!(err(
        &ar,
        SeqParams {
            max_new: 62,
            ..p.clone()
        }
    )
    .starts_with("max_new"));
    assert!(err(&ar, SeqParams { k: 2, ..p.clone() }).starts_with("k:"));
    assert!(err(&st, SeqParams { k: 3, ..p.clone() }).starts_with("k:"));
    assert!(err(
        &ar,
        SeqParams {
            penalty: 1.0,
            ..p.clone()
        }
    )
    .starts_with("penalty"));
    assert!(err(
        &st,
        SeqParams {
            logprobs: true,
            ..p.clone()
        }
    )
    .starts_with("logprobs"));
    assert!(err(
        &ar,
        SeqParams {
            tau: f64::NAN,
            ..p.clone()
        }
    )
    .starts_with("tau"));
    assert!(err(
        &ar,
        SeqParams {
            max_new: 0,
            ..p.clone()
        }
    )
    .starts_with("max_new"));
}
