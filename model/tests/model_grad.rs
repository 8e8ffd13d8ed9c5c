//! Finite-difference gradient check of a whole `tiny` DDiT (2 layers, d 64, 4 heads,
//! V 512) in f64: loss = mean cross-entropy of the next-token logits; ~30 probed
//! parameters spread over every kind of tensor (embedding, both LayerNorm weights, the
//! q/k/v thirds of attn_qkv, attn_out, both MLP weights and biases, the final norm and
//! head), including the mask column of the head (gradient exactly 0) and an embedding row
//! of a token that does not occur (gradient exactly 0).

mod common;

use common::{ids, random_model};
use kf_engine::autograd::no_grad;
use kf_engine::{DType, Device, Tensor};
use kf_model::{Ddit, DditConfig};
use kf_ops::cross_entropy::cross_entropy;

fn loss(model: &Ddit, x: &Tensor, y: &Tensor) -> Tensor {
    let logits = model.forward_train(x).unwrap();
    let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let flat = logits.reshape(&[b * t, v]).unwrap();
    cross_entropy(&flat, y, None).unwrap().0
}

#[test]
fn whole_tiny_model_gradients_match_finite_differences() {
    let mut cfg = DditConfig::preset("tiny").unwrap();
    cfg.mask_token_id = Some(3);
    let (b, t, v, d) = (2, 9, cfg.vocab_size, cfg.d_model);
    let mut model = random_model(&cfg, 11).to_dtype(DType::F64).unwrap();
    // inputs avoid token 1 (its embedding row must get exactly zero gradient)
    let mut toks = ids(b, t + 1, v, 5);
    for x in &mut toks {
        if *x == 1 {
            *x = 2;
        }
    }
    let (mut inp, mut tgt) = (Vec::new(), Vec::new());
    for r in toks.chunks(t + 1) {
        inp.extend_from_slice(&r[..t]);
        tgt.extend_from_slice(&r[1..]);
    }
    let x = Tensor::from_vec(inp, &[b, t], Device::Cpu).unwrap();
    let y = Tensor::from_vec(tgt.clone(), &[b * t], Device::Cpu).unwrap();

    model.set_trainable(true);
    let l = loss(&model, &x, &y);
    let grads = l.backward().unwrap();
    let l0 = l.to_scalar_f64().unwrap();
    assert!(l0.is_finite() && l0 > 0.0);

    // (parameter name, flat index): two per tensor kind, spread over the tensor
    let used = x.to_vec::<u32>().unwrap()[0] as usize;
    let mut probes: Vec<(String, usize)> = vec![
        ("vocab_embed.embedding".into(), used * d + 7),
        ("vocab_embed.embedding".into(), d + 5), // row 1: unused token, gradient 0
    ];
    for (layer, salt) in [(0usize, 1usize), (1, 2)] {
        let p = format!("blocks.{layer}");
        probes.push((format!("{p}.norm1.weight"), 3 * salt));
        probes.push((format!("{p}.attn_qkv.weight"), salt * 97)); // q rows
        probes.push((format!("{p}.attn_qkv.weight"), d * d + salt * 131)); // k rows
        probes.push((format!("{p}.attn_qkv.weight"), 2 * d * d + salt * 71)); // v rows
        probes.push((format!("{p}.attn_out.weight"), salt * 211));
        probes.push((format!("{p}.attn_out.weight"), d * d - salt * 29));
        probes.push((format!("{p}.norm2.weight"), 17 * salt));
        probes.push((format!("{p}.mlp.0.weight"), salt * 1009));
        probes.push((format!("{p}.mlp.0.bias"), salt * 37));
        probes.push((format!("{p}.mlp.2.weight"), salt * 503));
        probes.push((format!("{p}.mlp.2.weight"), 4 * d * d - salt * 19));
        probes.push((format!("{p}.mlp.2.bias"), salt * 11));
    }
    let mask = cfg.mask_token_id.unwrap() as usize;
    probes.push(("output_layer.norm_final.weight".into(), 9));
    probes.push(("output_layer.norm_final.weight".into(), 40));
    probes.push(("output_layer.linear.weight".into(), tgt[0] as usize * d + 2));
    probes.push(("output_layer.linear.weight".into(), mask * d + 4)); // mask row: gradient 0
    probes.push(("output_layer.linear.bias".into(), tgt[3] as usize));
    probes.push(("output_layer.linear.bias".into(), mask)); // mask column: gradient 0
    let exact_zero = |name: &str, i: usize| match name {
        "vocab_embed.embedding" => i / d == 1,
        "output_layer.linear.weight" => i / d == mask,
        "output_layer.linear.bias" => i == mask,
        _ => false,
    };
    assert!(probes.len() >= 30);

    let h = 1e-5;
    let mut worst = 0f64;
    for (name, i) in &probes {
        let p = model.param(name).unwrap().clone();
        assert!(*i < p.numel(), "{name}[{i}] out of range");
        let an = grads.get(&p).unwrap().to_vec::<f64>().unwrap()[*i];
        let eval = |delta: f64| {
            p.with_cpu_data_mut::<f64, _>(|s| s[*i] += delta).unwrap();
            let _ng = no_grad();
            let v = loss(&model, &x, &y).to_scalar_f64().unwrap();
            p.with_cpu_data_mut::<f64, _>(|s| s[*i] -= delta).unwrap();
            v
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        let err = (an - fd).abs();
        // central differences in f64: truncation ~h² and rounding ~1e-16/h, both < 1e-9
        let tol = 1e-7 + 1e-5 * fd.abs();
        eprintln!("{name}[{i}]: analytic {an:+.6e} finite-diff {fd:+.6e} |diff| {err:.1e}");
        assert!(
            err <= tol,
            "{name}[{i}]: analytic {an} vs finite difference {fd}"
        );
        worst = worst.max(err / (1e-7 + fd.abs()));
        if exact_zero(name, *i) {
            assert_eq!(an, 0.0, "{name}[{i}] must get exactly zero gradient");
        }
    }
    // the probes must see real gradients, not only zeros
    let nonzero = probes
        .iter()
        .filter(|(n, i)| {
            grads
                .get(model.param(n).unwrap())
                .unwrap()
                .to_vec::<f64>()
                .unwrap()[*i]
                .abs()
                > 1e-6
        })
        .count();
    assert!(
        nonzero >= probes.len() - 4,
        "only {nonzero} probes have a gradient"
    );
    eprintln!(
        "{} probes, loss {l0:.4}, worst relative error {worst:.2e}",
        probes.len()
    );
}
