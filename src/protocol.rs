//! Wire types of PROTOCOL §1-3: parsing requests (binary with a `userid`
//! header, or JSON with base64), and encoding results and errors.
//!
//! Pure functions over bytes and header values: no NATS client, no model.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Header that carries the user id on binary requests and on every answer.
pub const USERID_HEADER: &str = "userid";
/// Longest user id accepted, in bytes.
pub const MAX_USERID_BYTES: usize = 256;

/// The error codes of PROTOCOL §3, nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Binary form without a `userid` header, or JSON without `userid`.
    MissingUserid,
    /// Empty, longer than 256 bytes, not UTF-8, or with control characters.
    InvalidUserid,
    /// Starts with `{` but is not the JSON form, or `image` is not base64.
    BadJson,
    /// Zero-length picture.
    EmptyImage,
    /// Not a supported image format.
    UnsupportedFormat,
    /// A supported format, but corrupt or truncated.
    UndecodableImage,
    /// Over the encoded-size or pixel-count limit.
    ImageTooLarge,
    /// Anything else; the detail says what.
    Internal,
}

impl ErrorCode {
    /// Every code, in the order of the protocol's table.
    pub const ALL: [ErrorCode; 8] = [
        Self::MissingUserid,
        Self::InvalidUserid,
        Self::BadJson,
        Self::EmptyImage,
        Self::UnsupportedFormat,
        Self::UndecodableImage,
        Self::ImageTooLarge,
        Self::Internal,
    ];

    /// The code as it appears on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingUserid => "missing_userid",
            Self::InvalidUserid => "invalid_userid",
            Self::BadJson => "bad_json",
            Self::EmptyImage => "empty_image",
            Self::UnsupportedFormat => "unsupported_format",
            Self::UndecodableImage => "undecodable_image",
            Self::ImageTooLarge => "image_too_large",
            Self::Internal => "internal",
        }
    }

    /// Whether the request itself is at fault (retrying cannot help).
    pub fn is_bad_input(self) -> bool {
        self != Self::Internal
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user id that passed PROTOCOL §1's rules: 1 to 256 bytes of UTF-8
/// without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    /// Validates raw header or JSON bytes.
    pub fn parse(raw: &[u8]) -> Result<Self, RequestError> {
        let invalid = |detail: String| RequestError {
            code: ErrorCode::InvalidUserid,
            userid: None,
            detail,
        };
        if raw.is_empty() {
            return Err(invalid("userid is empty".into()));
        }
        if raw.len() > MAX_USERID_BYTES {
            return Err(invalid(format!(
                "userid is {} bytes, the limit is {MAX_USERID_BYTES}",
                raw.len()
            )));
        }
        let s =
            std::str::from_utf8(raw).map_err(|e| invalid(format!("userid is not UTF-8: {e}")))?;
        if s.chars().any(char::is_control) {
            return Err(invalid("userid contains control characters".into()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request that could not be parsed: its code, the user id when it was
/// readable, and a detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct RequestError {
    /// The protocol error code.
    pub code: ErrorCode,
    /// The valid user id, when the request had one.
    pub userid: Option<UserId>,
    /// What was wrong.
    pub detail: String,
}

/// A parsed request: who, and the picture's encoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The validated user id.
    pub userid: UserId,
    /// The picture as found on disk (still encoded).
    pub image: bytes::Bytes,
}

#[derive(Deserialize)]
struct JsonRequest {
    userid: Option<serde_json::Value>,
    image: Option<serde_json::Value>,
}

impl Request {
    /// Parses a payload and its `userid` header value (if any), telling the two
    /// encodings apart by the first byte (`{` means JSON).
    pub fn parse(
        payload: bytes::Bytes,
        userid_header: Option<&[u8]>,
    ) -> Result<Self, RequestError> {
        if payload.first() == Some(&b'{') {
            return Self::parse_json(&payload);
        }
        let raw = userid_header.ok_or_else(|| RequestError {
            code: ErrorCode::MissingUserid,
            userid: None,
            detail: format!("binary request without a `{USERID_HEADER}` header"),
        })?;
        let userid = UserId::parse(raw)?;
        Ok(Self {
            userid,
            image: payload,
        })
    }

    fn parse_json(payload: &[u8]) -> Result<Self, RequestError> {
        let bad = |userid: Option<UserId>, detail: String| RequestError {
            code: ErrorCode::BadJson,
            userid,
            detail,
        };
        let req: JsonRequest =
            serde_json::from_slice(payload).map_err(|e| bad(None, format!("invalid JSON: {e}")))?;
        let userid = match req.userid {
            None | Some(serde_json::Value::Null) => {
                return Err(RequestError {
                    code: ErrorCode::MissingUserid,
                    userid: None,
                    detail: "JSON request without `userid`".into(),
                });
            }
            Some(serde_json::Value::String(s)) => UserId::parse(s.as_bytes())?,
            Some(other) => {
                return Err(RequestError {
                    code: ErrorCode::InvalidUserid,
                    userid: None,
                    detail: format!("`userid` must be a string, got {other}"),
                });
            }
        };
        let image = match req.image {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(bad(
                    Some(userid),
                    format!("`image` must be a base64 string, got {}", kind(&other)),
                ));
            }
            None => return Err(bad(Some(userid), "JSON request without `image`".into())),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(image.as_bytes())
            .map_err(|e| {
                bad(
                    Some(userid.clone()),
                    format!("`image` is not valid base64: {e}"),
                )
            })?;
        Ok(Self {
            userid,
            image: bytes.into(),
        })
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The result JSON of PROTOCOL §2: a label for the face in the picture, or
/// nulls with `faces: 0` when there is no face.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileResult {
    /// Whose picture.
    pub userid: String,
    /// The label with the highest score; `null` when no face was found.
    pub gender: Option<String>,
    /// That label's score; `null` when no face was found.
    pub confidence: Option<f32>,
    /// Every label's probability; `null` when no face was found.
    pub scores: Option<BTreeMap<String, f32>>,
    /// Faces found; `null` when face detection is off.
    pub faces: Option<usize>,
    /// The face classified (the largest); `null` without one.
    pub face: Option<FaceBox>,
    /// The weights that produced it.
    pub model: String,
    /// Milliseconds from receipt to publication.
    pub latency_ms: f64,
}

/// A face's box in the picture's own pixels (after EXIF orientation),
/// origin top left, and the detector's confidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FaceBox {
    /// Left edge (may be negative for a face cut by the picture's edge).
    pub x: i64,
    /// Top edge.
    pub y: i64,
    /// Width.
    pub w: i64,
    /// Height.
    pub h: i64,
    /// Detector confidence, 0..1.
    pub score: f32,
}

impl From<&crate::face::Face> for FaceBox {
    fn from(f: &crate::face::Face) -> Self {
        Self {
            x: f.x.round() as i64,
            y: f.y.round() as i64,
            w: f.w.round() as i64,
            h: f.h.round() as i64,
            score: (f.score * 1e4).round() / 1e4,
        }
    }
}

/// What the worker saw in the picture, as §2 reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Seen {
    /// Face detection off: the whole picture was classified.
    Whole,
    /// `faces` faces; `face` was classified.
    Face {
        /// Faces found.
        faces: usize,
        /// The one classified.
        face: FaceBox,
    },
}

impl ProfileResult {
    /// Builds a result from label names and probabilities in the same order.
    pub fn new(
        userid: &UserId,
        labels: &[String],
        probs: &[f32],
        seen: Seen,
        model: &str,
        latency_ms: f64,
    ) -> Self {
        let best = crate::model::argmax(probs);
        let (faces, face) = match seen {
            Seen::Whole => (None, None),
            Seen::Face { faces, face } => (Some(faces), Some(face)),
        };
        Self {
            userid: userid.to_string(),
            gender: labels.get(best).cloned(),
            confidence: probs.get(best).copied(),
            scores: Some(labels.iter().cloned().zip(probs.iter().copied()).collect()),
            faces,
            face,
            model: model.to_owned(),
            latency_ms,
        }
    }

    /// The answer for a picture without a face: no label, `faces: 0`.
    pub fn no_face(userid: &UserId, model: &str, latency_ms: f64) -> Self {
        Self {
            userid: userid.to_string(),
            gender: None,
            confidence: None,
            scores: None,
            faces: Some(0),
            face: None,
            model: model.to_owned(),
            latency_ms,
        }
    }
}

/// The error JSON of PROTOCOL §3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The user id, `null` when it could not be read.
    pub userid: Option<String>,
    /// The code.
    pub error: ErrorCode,
    /// What went wrong.
    pub detail: String,
}

impl ErrorReply {
    /// An error for a request that got as far as a valid user id (or not).
    pub fn new(userid: Option<&UserId>, error: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            userid: userid.map(|u| u.to_string()),
            error,
            detail: detail.into(),
        }
    }
}

impl From<&RequestError> for ErrorReply {
    fn from(e: &RequestError) -> Self {
        Self::new(e.userid.as_ref(), e.code, e.detail.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(payload: &[u8], header: Option<&[u8]>) -> Result<Request, RequestError> {
        Request::parse(bytes::Bytes::copy_from_slice(payload), header)
    }

    #[test]
    fn binary_and_json_forms() {
        let r = parse(b"\xff\xd8jpeg", Some(b"abc")).unwrap();
        assert_eq!(
            (r.userid.as_str(), &r.image[..]),
            ("abc", &b"\xff\xd8jpeg"[..])
        );
        let r = parse(br#"{"userid":"u1","image":"aGVsbG8=","extra":1}"#, None).unwrap();
        assert_eq!((r.userid.as_str(), &r.image[..]), ("u1", &b"hello"[..]));
    }

    #[test]
    fn every_request_error_code() {
        let code = |p: &[u8], h: Option<&[u8]>| parse(p, h).unwrap_err().code;
        assert_eq!(code(b"\x89PNG", None), ErrorCode::MissingUserid);
        assert_eq!(
            code(br#"{"image":"aGVsbG8="}"#, None),
            ErrorCode::MissingUserid
        );
        assert_eq!(code(b"x", Some(b"")), ErrorCode::InvalidUserid);
        assert_eq!(code(b"x", Some(&[b'a'; 257])), ErrorCode::InvalidUserid);
        assert_eq!(code(b"x", Some(b"\xff\xfe")), ErrorCode::InvalidUserid);
        assert_eq!(code(b"x", Some(b"a\nb")), ErrorCode::InvalidUserid);
        assert_eq!(
            code(br#"{"userid":"","image":""}"#, None),
            ErrorCode::InvalidUserid
        );
        assert_eq!(
            code(br#"{"userid":"u","image":"!!"}"#, None),
            ErrorCode::BadJson
        );
        assert_eq!(code(br#"{"userid":"u"}"#, None), ErrorCode::BadJson);
        assert_eq!(code(b"{not json", None), ErrorCode::BadJson);
        assert!(parse(b"x", Some(&[b'a'; 256])).is_ok());
        // Bad base64 keeps the user id for the error reply.
        let e = parse(br#"{"userid":"u","image":"!!"}"#, None).unwrap_err();
        assert_eq!(e.userid.unwrap().as_str(), "u");
    }

    #[test]
    fn result_and_error_json() {
        let u = UserId::parse(b"u").unwrap();
        let labels = vec!["female".to_string(), "male".to_string()];
        let r = ProfileResult::new(&u, &labels, &[0.25, 0.75], Seen::Whole, "m/1", 1.5);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["gender"], "male");
        assert_eq!(v["confidence"], 0.75);
        assert_eq!(v["scores"]["female"], 0.25);
        // Detection off: the face fields are there, and null.
        assert!(v["faces"].is_null() && v["face"].is_null());
        assert!(v.as_object().unwrap().contains_key("faces"));
        let face = FaceBox {
            x: -3,
            y: 10,
            w: 120,
            h: 118,
            score: 0.98,
        };
        let seen = Seen::Face { faces: 2, face };
        let v = serde_json::to_value(ProfileResult::new(&u, &labels, &[0.9, 0.1], seen, "m", 1.0))
            .unwrap();
        assert_eq!(v["faces"], 2);
        assert_eq!(v["face"]["x"], -3);
        assert_eq!(v["face"]["w"], 120);
        let none = serde_json::to_value(ProfileResult::no_face(&u, "m/1", 2.0)).unwrap();
        for key in ["gender", "confidence", "scores", "face"] {
            assert!(none[key].is_null(), "{key}: {none}");
        }
        assert_eq!(none["faces"], 0);
        let e =
            serde_json::to_value(ErrorReply::new(None, ErrorCode::ImageTooLarge, "big")).unwrap();
        assert_eq!(
            e,
            serde_json::json!({"userid": null, "error": "image_too_large", "detail": "big"})
        );
    }
}
