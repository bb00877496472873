// Talk to a steer NPC from Unity with UnityWebRequest (no plugins).
//
// Attach to a GameObject, set serverUrl and npcId, then call Say("...") from your dialogue UI.
// The server runs `steer serve --policy DIR --npcs DIR` (docs/npc.md). The session id is kept in
// PlayerPrefs so the conversation resumes after the game restarts; with a fixed seed the NPC
// says the same lines for the same player lines.
using System;
using System.Collections;
using System.Text;
using UnityEngine;
using UnityEngine.Networking;

public class SteerNpc : MonoBehaviour
{
    public string serverUrl = "http://127.0.0.1:8000";
    public string npcId = "brom";
    public string apiKey = "";          // set when the server runs with --api-key
    public long seed = 7;               // -1: a new line every time
    public string playerName = "Ana";

    [Serializable] class SessionRequest { public long seed; public string player_name; }
    [Serializable] class SessionResponse { public string id; }
    [Serializable] class Clamp { public string attribute; public int requested; public int applied; }
    [Serializable] class Safety { public bool @checked; public bool fallback; public int regenerations; }
    [Serializable] public class Reply { public string content; public int index; public Clamp[] clamped; public Safety safety; }
    [Serializable] class ErrorBody { public ErrorInfo error; }
    [Serializable] class ErrorInfo { public string message; public string param; public string code; }

    string sessionId;

    IEnumerator EnsureSession()
    {
        sessionId = PlayerPrefs.GetString("steer-session-" + npcId, "");
        if (!string.IsNullOrEmpty(sessionId)) yield break;
        string body = seed >= 0
            ? JsonUtility.ToJson(new SessionRequest { seed = seed, player_name = playerName })
            : "{\"player_name\": \"" + playerName + "\"}";
        yield return Post($"/v1/npcs/{npcId}/sessions", body, text =>
        {
            sessionId = JsonUtility.FromJson<SessionResponse>(text).id;
            PlayerPrefs.SetString("steer-session-" + npcId, sessionId);
        });
    }

    // The player's line in, the NPC's reply out. humor etc. are clamped to the NPC's bounds by the server.
    public IEnumerator Say(string playerLine, Action<Reply> onReply, int humor = -1)
    {
        yield return EnsureSession();
        string mood = humor >= 0 ? ", \"attributes\": {\"humor\": " + humor + "}" : "";
        string body = "{\"content\": " + JsonString(playerLine) + mood + "}";
        yield return Post($"/v1/sessions/{sessionId}/messages", body, text => onReply(JsonUtility.FromJson<Reply>(text)));
    }

    IEnumerator Post(string path, string json, Action<string> onOk)
    {
        for (int attempt = 0; attempt < 5; attempt++)
        {
            using var request = new UnityWebRequest(serverUrl + path, "POST");
            request.uploadHandler = new UploadHandlerRaw(Encoding.UTF8.GetBytes(json));
            request.downloadHandler = new DownloadHandlerBuffer();
            request.SetRequestHeader("Content-Type", "application/json");
            if (!string.IsNullOrEmpty(apiKey)) request.SetRequestHeader("Authorization", "Bearer " + apiKey);
            yield return request.SendWebRequest();

            long status = request.responseCode;
            string retryAfter = request.GetResponseHeader("Retry-After");
            if ((status == 429 || status == 503) && retryAfter != null)
            {
                // Server full (429) or still loading (503): wait as asked, then try again.
                yield return new WaitForSeconds(float.Parse(retryAfter));
                continue;
            }
            if (status == 404 && path.StartsWith("/v1/sessions/"))
                PlayerPrefs.DeleteKey("steer-session-" + npcId);  // the session was deleted: start a new one next time
            if (request.result != UnityWebRequest.Result.Success)
            {
                var err = JsonUtility.FromJson<ErrorBody>(request.downloadHandler.text ?? "{}");
                Debug.LogError($"steer: {status} {err?.error?.message ?? request.error}");
                yield break;
            }
            onOk(request.downloadHandler.text);
            yield break;
        }
        Debug.LogError("steer: the dialogue server stayed busy");
    }

    static string JsonString(string s) =>
        "\"" + s.Replace("\\", "\\\\").Replace("\"", "\\\"").Replace("\n", "\\n").Replace("\r", "") + "\"";
}

// Usage from another script:
//   StartCoroutine(npc.Say("Can you fix my sword?", reply => dialogueBox.text = reply.content, humor: 1));
