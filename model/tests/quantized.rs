//! Our own models with their weight matrices in ggml blocks (`Ddit::quantized`,
//! `Pflm::quantized`, `kfrun ... --dtype q8_0|q4_0|q4_1`): the projections and the head
//! are rounded to blocks, the f32 parameters hold the blocks' dequantization, and the CPU
//! pass through the integer kernels computes that dequantized model up to the 8-bit
//! rounding of its activations.

mod common;

use common::{ids, random_model, random_student, small_cfg};
use kf_engine::autograd::no_grad;
use kf_engine::gemm::QFormat;
use kf_engine::{DType, Device, Tensor};
use kf_model::generate::GenerateOptions;
use kf_model::pflm::{generate_pflm, PflmGenerateOptions};
use kf_model::Ddit;

/// Per position, log-softmax of logits `[B, T, V]`.
fn log_probs(logits: &Tensor) -> Vec<Vec<f64>> {
    let v = *logits.shape().last().unwrap();
    logits
        .to_vec_f64()
        .unwrap()
        .chunks(v)
        .map(|r| {
            let m = r.iter().cloned().fold(f64::MIN, f64::max);
            let z = r.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
            r.iter().map(|x| x - z).collect()
        })
        .collect()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn forward(m: &Ddit, ids: &Tensor) -> Vec<Vec<f64>> {
    let _g = no_grad();
    log_probs(&m.forward_train(ids).unwrap())
}

#[test]
fn a_quantized_model_computes_its_dequantized_weights() {
    let cfg = small_cfg();
    let m = random_model(&cfg, 11);
    let x = Tensor::from_vec(ids(2, 24, cfg.vocab_size, 3), &[2, 24], Device::Cpu).unwrap();
    let exact = forward(&m, &x);
    let mut moved = Vec::new();
    for fmt in [QFormat::Q8_0, QFormat::Q4_1, QFormat::Q4_0] {
        let q = m.quantized(fmt).unwrap();
        // four projections per layer and the head
        assert_eq!(q.n_quantized(), 4 * cfg.n_layers + 1, "{fmt}");
        // the same parameters without the blocks (a conversion drops them): the f32 pass
        let deq = q.to_dtype(DType::F32).unwrap();
        assert_eq!(deq.n_quantized(), 0);
        let (a, b) = (forward(&q, &x), forward(&deq, &x));
        // the integer kernels round activations to 8-bit blocks: close, not equal
        let d_act = max_diff(&a, &b);
        assert!(
            d_act > 0.0 && d_act < 0.15,
            "{fmt}: integer pass vs its dequantized weights: max |log p diff| {d_act}"
        );
        // only the matrices moved: norms, biases and the embedding table are the same bits
        let mut changed = 0;
        for ((name, t), (_, t0)) in q.params().iter().zip(m.params()) {
            let (v, v0) = (t.to_vec::<f32>().unwrap(), t0.to_vec::<f32>().unwrap());
            let same = v.iter().zip(&v0).all(|(x, y)| x.to_bits() == y.to_bits());
            let matrix = name.ends_with("attn_qkv.weight")
                || name.ends_with("attn_out.weight")
                || name.ends_with("mlp.0.weight")
                || name.ends_with("mlp.2.weight")
                || name == "output_layer.linear.weight";
            assert_eq!(!same, matrix, "{fmt}: {name} changed: {}", !same);
            changed += usize::from(!same);
        }
        assert_eq!(changed, 4 * cfg.n_layers + 1);
        moved.push(max_diff(&b, &exact));
    }
    // rounding the weights moves the model, 4-bit blocks further than 8-bit ones
    assert!(
        moved[0] > 0.0 && moved[0] < moved[1] && moved[0] < moved[2],
        "max |log p diff| against the f32 model: q8_0 {} q4_1 {} q4_0 {}",
        moved[0],
        moved[1],
        moved[2]
    );
}

#[test]
fn a_quantized_student_keeps_its_noise_encoder_and_generates() {
    let s = random_student(4, 21);
    let q = s.quantized(QFormat::Q8_0).unwrap();
    assert_eq!(q.backbone.n_quantized(), 4 * s.cfg().n_layers + 1);
    for ((n, a), (_, b)) in q.noise.params().iter().zip(s.noise.params()) {
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
            "noise encoder {n}"
        );
    }
    let opts = PflmGenerateOptions {
        base: GenerateOptions {
            max_new: 9,
            tau: 1.0,
            seed: 2,
            first_stream: 0,
            eos: None,
            use_cache: true,
            vocab_limit: Some(95),
        },
        k: 4,
        freq_penalty: 0.0,
    };
    let prompts = vec![vec![1u32, 7, 9], vec![3, 4]];
    let _g = no_grad();
    let g = generate_pflm(&q, &prompts, &opts, |_, _| Ok(())).unwrap();
    assert!(g.tokens.iter().all(|t| t.len() == 9));
    assert_eq!(g.passes, 1 + 9usize.div_ceil(4));
}

#[test]
fn a_matrix_that_is_not_whole_blocks_is_refused() {
    // d = 48: the projections' rows are 48 long, not a multiple of 32
    let mut cfg = small_cfg();
    cfg.d_model = 48;
    let m = random_model(&cfg, 1);
    let e = format!("{:#}", m.quantized(QFormat::Q8_0).unwrap_err());
    assert!(e.contains("not whole blocks of 32"), "{e}");
}
