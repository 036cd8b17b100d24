//! Training-time augmentation on normalised HWC inputs: random horizontal
//! flip, random shift (edge pixels repeated), and brightness and contrast
//! jitter. Deterministic for a given random generator; never used at serving.

use rand::Rng;

/// How strongly to augment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Largest shift in pixels, each axis.
    pub max_shift: usize,
    /// Contrast factor drawn from `1 ± contrast`.
    pub contrast: f32,
    /// Brightness offset (in normalised units) drawn from `± brightness`.
    pub brightness: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            max_shift: 4,
            contrast: 0.2,
            brightness: 0.2,
        }
    }
}

impl Augment {
    /// Writes an augmented copy of `src` (`size x size x 3`) into `dst`.
    pub fn apply<R: Rng>(&self, src: &[f32], size: usize, dst: &mut [f32], rng: &mut R) {
        let flip = rng.random_bool(0.5);
        let range = self.max_shift as i64;
        let dx = rng.random_range(-range..=range) as isize;
        let dy = rng.random_range(-range..=range) as isize;
        let contrast = 1.0 + rng.random_range(-self.contrast..=self.contrast);
        let brightness = rng.random_range(-self.brightness..=self.brightness);
        let last = size as isize - 1;
        for y in 0..size {
            let sy = (y as isize + dy).clamp(0, last) as usize;
            for x in 0..size {
                let xx = if flip { size - 1 - x } else { x };
                let sx = (xx as isize + dx).clamp(0, last) as usize;
                let s = &src[(sy * size + sx) * 3..][..3];
                let d = &mut dst[(y * size + x) * 3..][..3];
                for c in 0..3 {
                    d[c] = s[c] * contrast + brightness;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn identity_when_disabled_up_to_flip() {
        let size = 4;
        let src: Vec<f32> = (0..size * size * 3).map(|v| v as f32).collect();
        let none = Augment {
            max_shift: 0,
            contrast: 0.0,
            brightness: 0.0,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..8 {
            let mut dst = vec![0.0; src.len()];
            none.apply(&src, size, &mut dst, &mut rng);
            let mut flipped = vec![0.0; src.len()];
            for y in 0..size {
                for x in 0..size {
                    for c in 0..3 {
                        flipped[(y * size + x) * 3 + c] = src[(y * size + size - 1 - x) * 3 + c];
                    }
                }
            }
            assert!(dst == src || dst == flipped);
        }
    }

    #[test]
    fn same_seed_same_output() {
        let src: Vec<f32> = (0..8 * 8 * 3).map(|v| (v as f32).sin()).collect();
        let run = || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut dst = vec![0.0; src.len()];
            Augment::default().apply(&src, 8, &mut dst, &mut rng);
            dst
        };
        assert_eq!(run(), run());
    }
}
