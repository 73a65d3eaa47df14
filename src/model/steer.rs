//! Edits of the residual stream at layer outputs: steering (add a vector) and directional
//! ablation (project a direction out), the instruments of the model-organisms work on
//! emergent misalignment (Turner, Soligo et al. 2025), and activation capture.
//!
//! A [`Directions`] holds one vector per layer (a misalignment direction: the difference of
//! mean activations between misaligned and aligned answers). An [`Intervention`] built from it
//! is set on a [`super::llama::Model`]; every forward (sampling, likelihoods, judging) then
//! applies it after each layer's residual update, at every position, so steered and ablated
//! samples come from the same sampling code as plain ones.
//!
//! Row independence: both edits are elementwise or a per-row reduction along the hidden axis,
//! so a row's result does not depend on the other rows of its batch (batched sampling stays
//! bit-identical to unbatched). Steering with scale 0 adds zeros, and ablating a zero
//! direction subtracts zeros: the residual stream, hence logits and samples, are bit for bit
//! those of the unedited model (tested).

use candle_core::{DType, Device, Tensor, D};

pub type Result<T> = candle_core::Result<T>;

/// One vector of `hidden` values per layer (layers not measured are `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct Directions {
    pub hidden: usize,
    pub layers: Vec<Option<Vec<f32>>>,
}

impl Directions {
    /// Euclidean norm of layer `l`'s vector (computed in f64).
    pub fn norm(&self, l: usize) -> Option<f64> {
        self.layers.get(l)?.as_ref().map(|v| norm(v))
    }

    /// Gaussian vectors with exactly this direction's per-layer norms (the random control),
    /// drawn from `seed`; the same seed gives the same vectors.
    pub fn random_like(&self, seed: u64) -> Directions {
        let mut rng = crate::util::rng::Rng::new(seed, 0x5eed);
        let layers = self
            .layers
            .iter()
            .map(|v| {
                v.as_ref().map(|v| {
                    let target = norm(v);
                    let r: Vec<f64> = (0..v.len()).map(|_| rng.normal()).collect();
                    let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                    r.iter().map(|x| (x / n * target) as f32).collect()
                })
            })
            .collect();
        Directions {
            hidden: self.hidden,
            layers,
        }
    }
}

/// Euclidean norm in f64.
pub fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// `v / |v|` in f64 then f32; zeros for a zero vector (its ablation is then the identity).
pub fn unit(v: &[f32]) -> Vec<f32> {
    let n = norm(v);
    if n == 0.0 {
        return vec![0.0; v.len()];
    }
    v.iter().map(|&x| (f64::from(x) / n) as f32).collect()
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    dot / (na * nb)
}

/// What is done at each layer's output: an optional unit direction projected out, then an
/// optional vector added.
pub struct Intervention {
    ablate: Vec<Option<Tensor>>,
    add: Vec<Option<Tensor>>,
}

impl Intervention {
    /// Nothing at any of `layers` layers.
    pub fn none(layers: usize) -> Intervention {
        Intervention {
            ablate: vec![None; layers],
            add: vec![None; layers],
        }
    }

    /// Add `scale * unit(v)` at layer `layer`'s output.
    pub fn steer(
        &mut self,
        layer: usize,
        v: &[f32],
        scale: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<()> {
        let add: Vec<f32> = unit(v)
            .iter()
            .map(|&u| (f64::from(u) * scale) as f32)
            .collect();
        let t = Tensor::from_vec(add, v.len(), dev)?.to_dtype(dtype)?;
        let slot = self
            .add
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no layer {layer}")))?;
        // Two steers at one layer add up.
        *slot = Some(match slot.take() {
            Some(prev) => (prev + t)?,
            None => t,
        });
        Ok(())
    }

    /// Project `unit(v)` out of layer `layer`'s output (computed in f32 whatever the
    /// activation dtype, so a bf16 model keeps no measurable projection).
    pub fn ablate(&mut self, layer: usize, v: &[f32], _dtype: DType, dev: &Device) -> Result<()> {
        let t = Tensor::from_vec(unit(v), v.len(), dev)?;
        *self
            .ablate
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no layer {layer}")))? = Some(t);
        Ok(())
    }

    /// Apply layer `li`'s edits to its output `x` (`[batch, t, hidden]`).
    pub fn apply(&self, li: usize, x: Tensor) -> Result<Tensor> {
        let mut x = x;
        if let Some(Some(u)) = self.ablate.get(li) {
            // x - (x . u) u: a per-row reduction, so rows stay independent; in f32.
            let dt = x.dtype();
            let xf = x.to_dtype(DType::F32)?;
            let coef = xf.broadcast_mul(u)?.sum_keepdim(D::Minus1)?;
            x = (&xf - coef.broadcast_mul(u)?)?.to_dtype(dt)?;
        }
        if let Some(Some(a)) = self.add.get(li) {
            x = x.broadcast_add(a)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_control_has_the_norms() {
        let d = Directions {
            hidden: 4,
            layers: vec![Some(vec![3.0, 4.0, 0.0, 0.0]), None, Some(vec![0.5; 4])],
        };
        let r = d.random_like(9);
        assert_eq!(r.layers[1], None);
        for l in [0, 2] {
            let (a, b) = (d.norm(l).unwrap(), r.norm(l).unwrap());
            assert!((a - b).abs() < 1e-6 * a, "layer {l}: {a} vs {b}");
        }
        assert!(cosine(d.layers[0].as_ref().unwrap(), r.layers[0].as_ref().unwrap()) < 0.99);
        assert_eq!(r, d.random_like(9));
        assert_ne!(r, d.random_like(10));
    }

    #[test]
    fn ablation_removes_the_projection() {
        let dev = Device::Cpu;
        let v = [1.0f32, 2.0, -2.0];
        let mut iv = Intervention::none(1);
        iv.ablate(0, &v, DType::F32, &dev).unwrap();
        let x = Tensor::new(&[[[3.0f32, 1.0, 7.0], [0.5, 0.5, 0.5]]], &dev).unwrap();
        let y = iv.apply(0, x).unwrap();
        let u = unit(&v);
        for row in y.flatten_to(1).unwrap().to_vec2::<f32>().unwrap() {
            let p: f32 = row.iter().zip(&u).map(|(a, b)| a * b).sum();
            assert!(p.abs() < 1e-6, "{p}");
        }
        // A zero direction is the identity, bit for bit.
        let mut z = Intervention::none(1);
        z.ablate(0, &[0.0; 3], DType::F32, &dev).unwrap();
        z.steer(0, &v, 0.0, DType::F32, &dev).unwrap();
        let x = Tensor::new(&[[[3.0f32, -1.5e-7, 7.0]]], &dev).unwrap();
        let y = z.apply(0, x.clone()).unwrap();
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn two_steers_at_one_layer_add_up() {
        let dev = Device::Cpu;
        let mut iv = Intervention::none(1);
        iv.steer(0, &[1.0, 0.0], 2.0, DType::F32, &dev).unwrap();
        iv.steer(0, &[0.0, 3.0], 1.0, DType::F32, &dev).unwrap();
        let x = Tensor::new(&[[[0.5f32, 0.5]]], &dev).unwrap();
        let y = iv
            .apply(0, x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, [2.5, 1.5]);
    }

    #[test]
    fn cosines() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
